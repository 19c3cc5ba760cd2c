#!/usr/bin/env python
"""Train a seqpar model: compose the Hydra config -> validate -> launch.

    python train.py                                   # gpt_tiny on the built-in corpus
    python train.py model=bert_tiny trainer.max_steps=30 hydra.run.dir=/tmp/run
    python train.py model=gpt_tiny parallel.sp=4      # 4 local processes, sequence parallel (ring attention)
    python train.py +experiment=bert_seq64k           # a preset experiment
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from seqpar.cli import fail, preflight
from seqpar.config import ConfigError, register_configs, to_config

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@hydra.main(config_path="configs", config_name="config", version_base=None)
def main(dcfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from seqpar.parallel.launch import RankFailed
    from seqpar.trainer import prepare, train
    from seqpar.trainer.loop import TrainingAborted

    cfg = to_config(dcfg)
    hydra_cfg = HydraConfig.get()
    cfg.run_dir = hydra_cfg.runtime.output_dir
    cfg.experiment = hydra_cfg.runtime.choices.get("experiment")
    try:
        # One process, or this rank of a torchrun/srun job, or `world_size` local processes started here.
        train(prepare(cfg))
    except ConfigError as e:
        fail(str(e))
    except TrainingAborted as e:
        fail(str(e), e.exit_code)
    except RankFailed as e:
        fail(str(e), e.exit_code)


if __name__ == "__main__":
    register_configs()
    preflight(CONFIG_DIR, sys.argv[1:])
    main()
