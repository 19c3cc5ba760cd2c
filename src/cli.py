"""The command line's error handling: every bad input becomes one line `error: <field> <problem>; <fix>`.

Hydra reports a bad override (unknown key, wrong type, unknown config option) as a multi-line message with a hint
about HYDRA_FULL_ERROR. `preflight()` composes the configuration with the same overrides first, before Hydra's
own run, and turns any such failure, and any `ConfigError` from validation, into the one line, exit code 2.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from seqpar.config import Config, ConfigError, register_configs, to_config

EXIT_CONFIG = 2


def fail(message: str, code: int = EXIT_CONFIG) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def describe_hydra_error(exc: BaseException) -> str:
    """One line (`<field> <problem>; <fix>`) for an exception raised while composing the config."""
    from omegaconf.errors import OmegaConfBaseException

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
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

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


def preflight(config_dir: str | Path, argv: list[str]) -> None:
    """Compose and validate before Hydra runs, so a bad input exits with one line and nothing is started.

    Skipped when Hydra flags are present (--multirun sweeps, --cfg, --help): Hydra handles those itself and the
    job still validates before it trains.
    """
    if any(a.startswith("-") for a in argv):
        return
    from seqpar.trainer import prepare

    try:
        prepare(compose(config_dir, argv, with_run_dir=True))
    except ConfigError as e:
        fail(str(e))
    except Exception as e:  # Hydra/OmegaConf composition errors
        fail(describe_hydra_error(e))
