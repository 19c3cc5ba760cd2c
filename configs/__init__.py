"""The Hydra configs, shipped inside the package as `seqpar.configs`: config.yaml (the defaults list) and its groups
(model/, data/, experiment/, debug/, cluster/, parallel/).

`CONFIG_DIR` is their one home on disk. The entry points (seqpar-train, seqpar-plan), the tests and the scripts
compose from it, so an installed package (site-packages/seqpar/configs) and an editable one (the checkout's
configs/) find the same files, from any working directory. A user's own directory adds to it through Hydra's
search path (`--config-dir DIR` or `hydra.searchpath=[file://DIR]`).
"""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
