"""The command line's configuration: the schema and its resolver registered with Hydra, composing and converting a
config, and turning every bad input into one line `error: <field> <problem>; <fix>`.

Hydra reports a bad override (unknown key, wrong type, unknown config option) as a multi-line message with a hint
about HYDRA_FULL_ERROR. `seqpar.preflight` composes the configuration with the same overrides first, before Hydra's
own run, and turns any such failure (`describe_hydra_error`), and any `UserError`, into the one line, exit code 2.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from seqpar.config import Config
from seqpar.errors import UserError

EXIT_CONFIG = 2


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore; `configs/config.yaml` lists it first in its defaults."""
    cs = ConfigStore.instance()
    cs.store(name="seqpar_schema", node=Config)
    if not OmegaConf.has_resolver("seqpar_tasks_per_node"):  # cluster/slurm.yaml: ranks per node of a job
        OmegaConf.register_new_resolver("seqpar_tasks_per_node", _tasks_per_node)


def _tasks_per_node(nodes: int, dp: int, pp: int, tp: int, sp: int) -> int:
    world = dp * pp * tp * sp
    if world % nodes:
        raise UserError("hydra.launcher.nodes", f"({nodes}) does not divide dp*pp*tp*sp = {world}",
                          "choose a node count that divides the number of ranks")
    return world // nodes


def to_config(cfg: Any) -> Config:
    """Convert a composed DictConfig to the dataclasses (once, at the entry point)."""
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config), type(obj)
    return obj


def fail(message: str, code: int = EXIT_CONFIG) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def describe_hydra_error(exc: BaseException) -> str:
    """One line (`<field> <problem>; <fix>`) for an exception raised while composing the config."""
    chain, e = [], exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            msg = str(getattr(e, "msg", "") or e).strip().splitlines()[0]
            key = e.full_key
            if "not in struct" in msg or "Key '" in msg and "not" in msg:
                return f"{key} is not a known setting; check the spelling (python train.py --cfg job lists them)"
            return f"{key} {msg[0].lower() + msg[1:]}; pass a value of the right type"
    text = str(exc).strip()
    m = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if m:
        group, name = m.groups()
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        choices = f"choose one of: {', '.join(options)}" if options else f"see configs/{group}/"
        return f"{group} {name!r} is not a known option; {choices}"
    m = re.search(r"Error parsing override '([^']*)'", text)
    if m:
        return f"override {m.group(1)!r} is not of the form key=value; write key=value, or +key=value to add a key"
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"override failed: {first.rstrip('.')}; check the override (key=value, +experiment=<name>)"


def compose(config_dir: str | Path, overrides: list[str], config_name: str = "config", with_run_dir: bool = False) -> Config:
    """Compose and convert the configuration as `train.py` would (used for preflight checks and tests).
    `with_run_dir`: also resolve Hydra's run directory (`hydra.run.dir`) into `run_dir`."""
    register_configs()
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
        dcfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=with_run_dir)
        run_dir = None
        if with_run_dir:
            run_dir = str(dcfg.hydra.run.dir)
            with open_dict(dcfg):
                del dcfg["hydra"]
    cfg = to_config(dcfg)
    cfg.run_dir = run_dir
    return cfg


CONFIG_DIR_FLAGS = ("--config-dir", "-cd")  # Hydra's flag for a directory of the user's own configs


def split_config_dir(argv: list[str]) -> tuple[str | None, list[str]] | None:
    """`argv` as (the directory of Hydra's --config-dir/-cd flag or None, the overrides), or None when it holds any
    other flag (--multirun, --cfg, --help, --config-name, ...)."""
    config_dir, overrides, args = None, [], iter(argv)
    for arg in args:
        name, eq, value = arg.partition("=")
        if name in CONFIG_DIR_FLAGS:
            config_dir = value if eq else next(args, "")
        elif arg.startswith("-"):
            return None
        else:
            overrides.append(arg)
    return config_dir, overrides


def with_config_dir(overrides: list[str], config_dir: str) -> list[str]:
    """`overrides` with `config_dir` added to Hydra's search path where `--config-dir` puts it: after the primary
    config directory, before the entries of a `hydra.searchpath=[...]` override."""
    path = Path(config_dir).resolve()
    if not config_dir or not path.is_dir():
        raise UserError("--config-dir", f"({config_dir}) is not a directory", "pass a directory of config files")
    searchpath, rest = [], []
    for o in overrides:
        if o.split("=", 1)[0] == "hydra.searchpath":
            searchpath = list(OverridesParser.create().parse_override(o).value())
        else:
            rest.append(o)
    quoted = ("'" + p.replace("'", "\\'") + "'" for p in [f"file://{path}", *searchpath])  # any path, spaces too
    entries = ",".join(quoted)
    return [*rest, f"hydra.searchpath=[{entries}]"]
