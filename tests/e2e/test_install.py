"""The package as a user installs it: `pip install .` or the wheel, not editable.

The wheel is built from the checkout's sources and installed into a fresh virtual environment that sees the
test environment's dependencies (torch and the rest, already installed) but neither the checkout nor its editable
seqpar. From a directory outside the checkout, the console scripts then train (on 2 local processes, with a model
from the user's own config directory), plan and export.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ..conftest import CONFIG_DIR, ROOT, cli_env

# One worker runs them all, in order: they share the built wheel and the environment it is installed in.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("install")]

SOURCES = ("pyproject.toml", "setup.py", "README.md", "src", "configs")
SCRIPTS = {"seqpar-train": "seqpar.train:main", "seqpar-plan": "seqpar.plan.cli:main", "seqpar-export": "seqpar.export:main",
           "seqpar-prepare": "seqpar.prepare:main"}
RUN = ["trainer.max_steps=2", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=1",
       "trainer.threads=1", "device=cpu", "logger.wandb.mode=disabled"]


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline from a copy of the sources (a build inside the checkout leaves a build/ folder
    whose stale files a later build would pack)."""
    tree = tmp_path_factory.mktemp("sources")
    for name in SOURCES:
        if not (ROOT / name).exists():
            continue  # what the wheel then lacks, the tests below say
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, tree / name)
    out = tmp_path_factory.mktemp("dist")
    ok(subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                       "-q", "-w", str(out), str(tree)], capture_output=True, text=True, timeout=300))
    (whl,) = out.glob("seqpar-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory, cache_dir) -> dict:
    """A fresh venv with the wheel installed (no -e): the test environment's site-packages are on its path as
    plain directories (path lines in a .pth file), so the editable install's import hook there never runs."""
    venv = tmp_path_factory.mktemp("venv")
    ok(subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(venv)], capture_output=True,
                      text=True, timeout=120))
    python = venv / "bin" / "python"
    site = ok(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True)).stdout.strip()
    # The test environment's import path (its site-packages and what their .pth files added), without the
    # checkout's own folders (the test environment's venv may lie inside the checkout, as in CI).
    def wanted(p: str) -> bool:
        path = Path(p).resolve()
        in_checkout = path == ROOT or ROOT in path.parents
        return path.is_dir() and (not in_checkout or path.name in ("site-packages", "dist-packages"))

    deps = [p for p in dict.fromkeys(sys.path) if p and wanted(p)]
    (Path(site) / "test-environment.pth").write_text("".join(f"{p}\n" for p in deps))
    # pip comes from the test environment too; --ignore-installed: the editable seqpar there is not this venv's.
    ok(subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                       str(wheel)], capture_output=True, text=True, timeout=300))
    env = {k: v for k, v in cli_env(cache_dir).items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               CUDA_VISIBLE_DEVICES="")
    work = tmp_path_factory.mktemp("work")  # the working directory: outside the checkout
    assert ROOT not in work.parents
    return {"venv": venv, "python": python, "env": env, "work": work}


def run(installed: dict, program, *args, timeout: int = 120) -> subprocess.CompletedProcess:
    """A command in the installed venv (a console script: the venv's own), from the working directory outside the
    checkout."""
    if program in SCRIPTS:
        program = installed["venv"] / "bin" / program
    return subprocess.run([str(c) for c in (program, *args)], cwd=installed["work"], env=installed["env"],
                          capture_output=True, text=True, timeout=timeout)


def test_wheel_holds_every_module_config_and_script(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {"seqpar/" + p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src").rglob("*.py")}
    configs = {"seqpar/configs/" + p.relative_to(CONFIG_DIR).as_posix()
               for p in CONFIG_DIR.rglob("*") if p.suffix in (".py", ".yaml")}
    assert {"seqpar/parallel/sequence/ring.py", "seqpar/train.py", "seqpar/configs/config.yaml"} <= modules | configs
    assert not (modules | configs) - names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(zipfile.ZipFile(wheel).read(entry_points).decode())
    assert dict(parser["console_scripts"]) == SCRIPTS


def test_installed_package_is_the_wheel_not_the_checkout(installed):
    proc = ok(run(installed, installed["python"], "-c", "import seqpar.configs, seqpar.trainer.loop; "
                  "print(seqpar.__file__); print(seqpar.configs.CONFIG_DIR)"))
    package, configs = (Path(p) for p in proc.stdout.split())
    assert installed["venv"] in package.parents and configs == package.parent / "configs"
    assert (configs / "model" / "gpt_tiny.yaml").is_file()
    assert all((installed["venv"] / "bin" / name).is_file() for name in SCRIPTS)


def test_seqpar_train_on_two_processes_with_a_users_model_then_export(installed, tmp_path):
    """`seqpar-train` with parallel.sp=2 (two local processes) from outside the checkout, on a model defined in the
    user's own config directory; `seqpar-export` turns its checkpoint into a transformers directory."""
    mine = tmp_path / "my_configs" / "model"
    mine.mkdir(parents=True)
    tiny = (CONFIG_DIR / "model" / "gpt_tiny.yaml").read_text()
    (mine / "mine.yaml").write_text(tiny.replace("name: gpt_tiny", "name: mine").replace("num_layers: 4", "num_layers: 2"))
    help_text = ok(run(installed, installed["python"], "-m", "seqpar.train", "--config-dir", mine.parent, "--help")).stdout
    assert "model: bert_base, bert_large, bert_tiny, gpt2_medium, gpt2_small, gpt_tiny, llama_125m, llama_1b, llama_8b, llama_tiny, mine" in help_text

    out = tmp_path / "run"
    ok(run(installed, "seqpar-train", "--config-dir", mine.parent, "model=mine", "parallel.sp=2", *RUN,
           f"hydra.run.dir={out}", timeout=300))
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["loss"] > 0 for r in steps)
    assert (out / ".hydra" / "config.yaml").read_text().count("name: mine") == 1

    exported = tmp_path / "exported"
    proc = ok(run(installed, "seqpar-export", out / "checkpoints", exported))
    assert "exported" in proc.stdout
    assert json.loads((exported / "config.json").read_text())["n_layer"] == 2
    assert (exported / "model.safetensors").is_file()


def test_seqpar_plan_as_in_the_readme(installed):
    proc = ok(run(installed, "seqpar-plan", "model=bert_base", "data.seq_len=65536", "model.max_seq_len=65536",
                  "trainer.global_batch_size=8", "trainer.activation_checkpointing=true", "--gpus", "64",
                  "--gpu-mem-gib", "80"))
    assert proc.stdout.startswith("bert_base, 65536 tokens x 8 sequences per step")
    assert "\nbest: parallel.dp=" in proc.stdout


def test_a_bad_value_in_a_users_config_is_one_error_line(installed, tmp_path):
    """The checks before any process starts read the user's directory given as Hydra's search path."""
    (tmp_path / "model").mkdir()
    tiny = (CONFIG_DIR / "model" / "gpt_tiny.yaml").read_text()
    (tmp_path / "model" / "odd.yaml").write_text(tiny.replace("num_heads: 4", "num_heads: 3"))
    proc = run(installed, "seqpar-train", f"hydra.searchpath=[file://{tmp_path}]", "model=odd",
               f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: model.hidden_size (128) is not divisible by model.num_heads (3); choose num_heads that divides "
        "hidden_size"), proc.stderr
    assert not (tmp_path / "run").exists()
