#!/usr/bin/env python
"""Train a seqpar model from a checkout: the same command as the installed `seqpar-train` (see seqpar.train).

    python train.py                                   # gpt_tiny on the built-in corpus
    python train.py model=bert_tiny trainer.max_steps=30 hydra.run.dir=/tmp/run
    python train.py model=gpt_tiny parallel.sp=4      # 4 local processes, sequence parallel (ring attention)
    python train.py +experiment=bert_seq64k           # a preset experiment
"""

from seqpar.train import main

if __name__ == "__main__":
    main()
