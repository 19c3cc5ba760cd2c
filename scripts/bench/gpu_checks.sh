#!/usr/bin/env bash
# What only a GPU can show, in one run of about 8 minutes on one H200, most valuable first, each part under its own
# time cap (and all of them within GPU_CHECKS_BUDGET_S), a failed part recorded and the next one run:
#   env         GPU, driver, CUDA and torch versions (env.json)
#   cuda_tests  the tests that skip without CUDA (tests/unit/test_block_kernels.py and any other test file that
#               asks torch.cuda.is_available())
#   ring        ring attention's CUDA path in one process, ranks as threads (gpu_ring.py): bf16 and fp32, causal and
#               bidirectional, padded, plain and memory-lean backward, sp=2 and sp=4 (grouped-query), against SDPA
#   train       train.py, gpt2_small and bert_base, 1024 tokens, 200 steps: bf16 against fp32 (within 2%); a bf16
#               run killed after its checkpoint and resumed (fused AdamW's state on the device) against the
#               uninterrupted one
#   mfu         scripts/bench/mfu.py: gpt2_small at 1024 and 8192 tokens, bert_base at 512 and 8192 (goal: 45% for
#               gpt2_small at 1024; the profile's top kernels when short of it)
#   planner     one-process peaks (torch.cuda.max_memory_allocated, max_memory_reserved beside it) against the
#               planner: without and with activation checkpointing, and with the longest-sequence settings
#   throughput  ours against transformers' models (llama_125m, gpt2_small, bert_base), bf16, one training step
#               (scripts/bench/throughput.py; the goal: Llama at least 1.2x faster)
#   longest     the longest llama_1b sequence that trains here with fused loss, tiled MLP, offloaded checkpointing
#               and bf16 (doubling, bisecting after an out-of-memory, within the time left), against the planner
# Every part writes out_dir/<part>.log and out_dir/<part>.json; out_dir/results.json merges them (with each part's
# exit status, seconds and command), and out_dir/logs.tar.gz holds every log, JSON and config (no checkpoints): the
# two files to copy off the machine. The exit status is 0 when every part passed.
# On a machine with no package index, first run scripts/bench/gpu_wheels.sh where pip reaches one and bring its
# folder (.gpu_wheels/) with the checkout: the install below uses it.
#
#   bash scripts/bench/gpu_checks.sh [out_dir]                     # default out_dir: gpu_checks
#   GPU_CHECKS_PARTS="ring train" bash scripts/bench/gpu_checks.sh out   # only these parts (a re-run after a fix)
#   GPU_CHECKS_DEVICE=cpu bash scripts/bench/gpu_checks.sh /tmp/dry      # the same plumbing on CPU, tiny models
set -uo pipefail
cd "$(dirname "$0")/../.."
out=$(realpath -m "${1:-gpu_checks}")
mkdir -p "$out"
device=${GPU_CHECKS_DEVICE:-cuda}
budget=${GPU_CHECKS_BUDGET_S:-480}
parts=" ${GPU_CHECKS_PARTS:-env cuda_tests ring train mfu planner throughput longest} "
py=${PYTHON:-$(command -v python3 || command -v python)}  # python3 first: on some images `python` is another one
checks="$py scripts/bench/gpu_checks.py"
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

# With the folder of scripts/bench/gpu_wheels.sh (a machine with no package index): those wheels and seqpar from
# this checkout go into a folder of their own on PYTHONPATH, with no index, no dependencies and no build isolation,
# so the machine's CUDA torch stays; it is made anew each run, so a re-run after a fix runs the fixed code.
# Otherwise seqpar as installed, or `pip install -e .[dev]` where it is not.
wheels=${GPU_CHECKS_WHEELS:-.gpu_wheels}
if [[ -d $wheels ]]; then
  site=$(realpath -m "${GPU_CHECKS_SITE:-/tmp/seqpar-gpu-site}")
  rm -rf "$site"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  shopt -s nullglob
  found=("$wheels"/*.whl)
  shopt -u nullglob
  tree=$(mktemp -d)  # seqpar built from a copy: a build in the checkout leaves build/, whose stale files persist
  cp -r pyproject.toml setup.py README.md src configs "$tree"
  { ((${#found[@]} == 0)) || $py -m pip install -q --no-index --no-deps --no-compile --target "$site" "${found[@]}"; } &&
    $py -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$site" "$tree" ||
    { echo "seqpar does not install from $wheels into $site"; exit 2; }
  rm -rf "$tree"
elif ! $py -c "import seqpar" 2>/dev/null; then
  $py -m pip install -q -e ".[dev]" || { echo "seqpar does not install"; exit 2; }
fi
$py -c "import seqpar.train" || { echo "seqpar does not import (see above)"; exit 2; }

start=$SECONDS
: > "$out/status.tsv"
# part NAME CAP_S COMMAND: run COMMAND (a bash string; $CAP is the part's time cap in seconds, less than CAP_S when
# the budget is nearly spent) under `timeout`, its output in NAME.log, its status in status.tsv.
part() {
  local name=$1 cap=$2 cmd=$3
  [[ $parts == *" $name "* ]] || return 0
  local left=$((budget - (SECONDS - start)))
  if ((left < 30)); then
    printf '%s\t%s\t%s\t%s\n' "$name" 125 0 "not run: the budget of ${budget}s was spent" >> "$out/status.tsv"
    echo "[$name] not run: budget spent"
    return 0
  fi
  ((cap > left)) && cap=$left
  rm -f "$out/$name.json"
  local t0=$SECONDS
  CAP=$cap timeout -k 15 "$cap" bash -c "$cmd" > "$out/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$cmd" >> "$out/status.tsv"
  echo "[$name] exit $rc after $((SECONDS - t0))s (cap ${cap}s): $out/$name.log"
}

cuda_tests=$(grep -rlE 'cuda\.is_available\(\)' tests --include='test_*.py' | sort | tr '\n' ' ')
cuda_tests=${cuda_tests:-tests/unit/test_block_kernels.py}
if [[ $device == cuda ]]; then
  train="--models gpt2_small bert_base --seq 1024 --batch 8 --steps 200 --ckpt-every 100 --jobs 6"
  mfu="--runs gpt2_small:1024:16 gpt2_small:8192:2 bert_base:512:32 bert_base:8192:2 --steps 12 --warmup 4"
  size="data.seq_len=1024 model.max_seq_len=1024 trainer.global_batch_size=8 trainer.precision=bf16"
  bsize="data.seq_len=512 model.max_seq_len=512 trainer.global_batch_size=16 trainer.precision=bf16"
  lsize="data.seq_len=16384 model.max_seq_len=16384 trainer.global_batch_size=1 trainer.precision=bf16"
  planner=(--jobs 5 --configs "gpt2_small=model=gpt2_small $size"
           "gpt2_small checkpointing=model=gpt2_small $size trainer.activation_checkpointing=true"
           "bert_base=model=bert_base $bsize" "bert_base checkpointing=model=bert_base $bsize trainer.activation_checkpointing=true")
  llama=(--model llama_1b --start 32768 --unit 4096)
  throughput="--runs llama_125m:1024:8 gpt2_small:1024:8 bert_base:512:16"
  lmodel=gpt2_small
else  # the dry run: every part's plumbing on CPU with tiny models, a few steps, short sequences
  train="--models gpt_tiny bert_tiny --seq 128 --batch 4 --steps 20 --ckpt-every 8 --jobs 2 --threads 1"
  mfu="--runs gpt_tiny:128:4 bert_tiny:128:4 --steps 4 --warmup 1 --goal gpt_tiny:128 --profile always --profile-steps 3 --threads 1"
  size="data.seq_len=256 model.max_seq_len=256 trainer.global_batch_size=8"
  bsize=$size
  lsize="data.seq_len=2048 model.max_seq_len=2048 trainer.global_batch_size=1 model.hidden_size=256 model.ffn_hidden_size=1024"
  planner=(--jobs 2 --threads 1 --configs "gpt_tiny=model=gpt_tiny $size"
           "gpt_tiny checkpointing=model=gpt_tiny $size trainer.activation_checkpointing=true"
           "bert_tiny checkpointing=model=bert_tiny $bsize trainer.activation_checkpointing=true")
  llama=(--model llama_tiny --start 256 --unit 128 --max-attempts 3 --planner-max 65536 --threads 1)
  throughput="--runs llama_tiny:128:2 gpt_tiny:128:2 --steps 2 --warmup 1 --goal llama_tiny --threads 1"
  lmodel=gpt_tiny
fi
planner+=("$lmodel longest settings=model=$lmodel $lsize trainer.fused_loss=true trainer.tiled_mlp=true trainer.activation_checkpointing=offload")
q() { printf '%q ' "$@"; }  # an argument list as one bash string

part env 60 "$checks env --device $device --json $out/env.json; nvidia-smi 2>/dev/null || true"
part cuda_tests 120 "$py -m pytest -q -n 0 -p no:cacheprovider -rs $cuda_tests --junitxml $out/cuda_tests.xml; \
$checks junit --device $device $out/cuda_tests.xml --json $out/cuda_tests.json"
part ring 90 "$checks ring --device $device --json $out/ring.json"
part train 210 "$checks train --device $device $train --timeout \$((CAP - 20)) --out $out/train --json $out/train.json"
part mfu 150 "$checks mfu --device $device $mfu --timeout \$((CAP / 3)) --out $out/mfu --json $out/mfu.json"
part planner 100 "$checks planner --device $device $(q "${planner[@]}") --timeout \$((CAP - 20)) --out $out/planner \
--json $out/planner.json"
part throughput 80 "$checks throughput --device $device $throughput --timeout \$((CAP / 3)) --out $out/throughput \
--json $out/throughput.json"
part longest 170 "$checks longest --device $device $(q "${llama[@]}") --budget-s \$((CAP - 20)) --out $out/longest \
--json $out/longest.json"

$checks merge "$out" > /dev/null
echo "results: $out/results.json ($((SECONDS - start))s)"
$py -c "import json, sys; r = json.load(open(sys.argv[1])); print(json.dumps(r['summary'], indent=1)); \
sys.exit(0 if r['ok'] else 1)" "$out/results.json"
