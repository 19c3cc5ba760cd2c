"""A user's own config directory beside the packaged configs: the checks before a run read it as Hydra will,
whether it comes as `--config-dir DIR` (`-cd`), as `hydra.searchpath=[file://DIR]`, or both."""

from __future__ import annotations

from pathlib import Path

import pytest

from seqpar.cli import split_config_dir, with_config_dir
from seqpar.errors import UserError
from seqpar.preflight import preflight

from ..conftest import CONFIG_DIR


def user_configs(root: Path, **models: int) -> Path:
    """A directory with model/<name>.yaml for each name: gpt_tiny with that many heads."""
    (root / "model").mkdir(parents=True)
    tiny = (CONFIG_DIR / "model" / "gpt_tiny.yaml").read_text()
    for name, heads in models.items():
        text = tiny.replace("name: gpt_tiny", f"name: {name}").replace("num_heads: 4", f"num_heads: {heads}")
        (root / "model" / f"{name}.yaml").write_text(text)
    return root


@pytest.mark.parametrize("argv,expected", [
    (["--config-dir", "d", "a=1"], ("d", ["a=1"])),
    (["a=1", "-cd=d", "b=2"], ("d", ["a=1", "b=2"])),
    (["a=1"], (None, ["a=1"])),
    (["-m", "parallel.sp=2,4"], None),  # sweeps, --cfg, --help, --config-name: Hydra's own
    (["-cd", "d", "--cfg", "job"], None),
    (["-cd", "d", "-cn", "mine"], None),
])
def test_the_config_dir_flag_is_read_and_other_flags_skip_the_checks(argv, expected):
    assert split_config_dir(argv) == expected


def test_config_dir_goes_before_the_searchpath_override(tmp_path):
    d = tmp_path / "it's mine"
    d.mkdir()
    got = with_config_dir(["a=1", "hydra.searchpath=[pkg://other.configs,file:///x]"], str(d))
    assert got == ["a=1", f"hydra.searchpath=['file://{tmp_path}/it\\'s mine','pkg://other.configs','file:///x']"]
    with pytest.raises(UserError, match=r"^--config-dir \(.*missing\) is not a directory"):
        with_config_dir([], str(tmp_path / "missing"))


@pytest.mark.parametrize("how", ["--config-dir", "-cd=", "hydra.searchpath"])
def test_checks_read_the_users_config_dir(tmp_path, capsys, monkeypatch, how):
    """A model of the user's own passes the checks, and its bad value fails them with its one line."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    d = user_configs(tmp_path / "my configs", mine=2, odd=3)
    where = {"--config-dir": ["--config-dir", str(d)], "-cd=": [f"-cd={d}"],
             "hydra.searchpath": [f"hydra.searchpath=['file://{d}']"]}[how]
    run = f"hydra.run.dir={tmp_path / 'run'}"
    preflight(CONFIG_DIR, [*where, "model=mine", run])
    with pytest.raises(SystemExit) as exit_info:
        preflight(CONFIG_DIR, [*where, "model=odd", run])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: model.hidden_size (128) is not divisible by model.num_heads (3); choose num_heads that divides "
        "hidden_size")
    assert not (tmp_path / "run").exists()


def test_config_dir_and_searchpath_together(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    a, b = user_configs(tmp_path / "a", mine=2), user_configs(tmp_path / "b", theirs=2)
    for model in ("mine", "theirs"):
        preflight(CONFIG_DIR, ["-cd", str(a), f"hydra.searchpath=[file://{b}]", f"model={model}"])


def test_a_missing_config_dir_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        preflight(CONFIG_DIR, ["--config-dir", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --config-dir ({tmp_path / 'missing'}) is not a directory; pass a directory of config files")


def test_the_planner_reads_the_users_config_dir(tmp_path, capsys):
    from seqpar.plan.cli import main

    d = user_configs(tmp_path / "mine", mine=2)
    main(["--config-dir", str(d), "model=mine", "--gpus", "2", "--gpu-mem-gib", "80", "--json"])
    assert capsys.readouterr().out.lstrip().startswith("[")
    with pytest.raises(SystemExit) as exit_info:
        main(["model=mine", "--gpus", "2", "--gpu-mem-gib", "80"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: model 'mine' is not a known option")
