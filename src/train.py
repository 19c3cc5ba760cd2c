"""Training from the command line: compose the Hydra config -> validate -> launch.

    seqpar-train                                      # gpt_tiny on the built-in corpus
    seqpar-train model=bert_tiny trainer.max_steps=30 hydra.run.dir=/tmp/run
    seqpar-train model=gpt_tiny parallel.sp=4         # 4 local processes, sequence parallel (ring attention)
    seqpar-train +experiment=bert_seq64k              # a preset experiment
    seqpar-train --config-dir ~/my_configs model=mine # a config group option of your own

`seqpar-train`, `python -m seqpar.train` and a checkout's `python train.py` are this module's `main()`. The configs
come from the package (`seqpar.configs`), whatever the working directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from seqpar.cli import fail, register_configs, to_config
from seqpar.configs import CONFIG_DIR
from seqpar.data.build import BuiltSequences
from seqpar.errors import UserError
from seqpar.parallel.launch import RankFailed
from seqpar.preflight import Job, preflight, prepare
from seqpar.trainer.job import launch_job
from seqpar.trainer.loop import TrainingAborted


def run_job(dcfg: DictConfig, prepared: Job | None = None, built: BuiltSequences | None = None) -> None:
    """One Hydra job (each run of a multirun too): convert the config once and train. `prepared`: the job the
    preflight already prepared from the same command line (used when it resolved the same run directory, so that
    validation, `parallel=auto` and the resume checks run once); `built`: the data of the previous job."""
    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    try:
        if prepared is not None and Path(prepared.cfg.run_dir or "").resolve() == Path(run_dir).resolve():
            job = prepared
        else:
            cfg = to_config(dcfg)
            cfg.run_dir = run_dir
            job = prepare(cfg)
        job.cfg.run_dir = run_dir
        job.cfg.experiment = hydra_cfg.runtime.choices.get("experiment")
        # One process, or this rank of a torchrun/srun job, or `world_size` local processes started here.
        launch_job(job, built)
    except UserError as e:
        fail(str(e))
    except TrainingAborted as e:
        fail(str(e), e.exit_code)
    except RankFailed as e:
        fail(str(e), e.exit_code)


def main() -> None:
    """The command line (Hydra's overrides and flags in sys.argv): a bad input exits with one `error:` line
    before Hydra makes a run directory, then Hydra runs the job."""
    register_configs()
    prepared = preflight(CONFIG_DIR, sys.argv[1:])
    built = BuiltSequences()

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
    def hydra_job(dcfg: DictConfig) -> None:
        run_job(dcfg, prepared, built)

    hydra_job()


if __name__ == "__main__":
    main()
