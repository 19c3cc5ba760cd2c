#!/usr/bin/env bash
# The wheels a GPU machine with no package index needs before scripts/bench/gpu_checks.sh can run there.
#
# A typical GPU image ships CUDA torch, transformers, tokenizers, safetensors, numpy, pytest (with pytest-timeout and
# pytest-xdist), rich and PyYAML, but not Hydra; and reinstalling seqpar's dependencies there would replace its CUDA
# torch. Run this where pip reaches an index; copy the folder (default .gpu_wheels/, which git ignores) along with
# the checkout; gpu_checks.sh then installs these wheels and seqpar itself into a folder of their own with no index,
# no dependencies and no build isolation, leaving the machine's torch as it is. All of them are pure Python, so one
# folder serves any Python version and platform.
#
#   bash scripts/bench/gpu_wheels.sh [dir]
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-.gpu_wheels}
mkdir -p "$dir"
py=${PYTHON:-python3}
# hydra-core and omegaconf import the ANTLR runtime; PyPI has that one only as source, so `pip wheel` builds it.
# setuptools: builds seqpar's wheel there without build isolation (pyproject.toml's license field needs >= 77).
$py -m pip wheel -q --no-deps -w "$dir" "hydra-core==1.3.2" "omegaconf==2.3.0" "antlr4-python3-runtime==4.9.3" \
  "setuptools==80.9.0"
ls -1 "$dir"
