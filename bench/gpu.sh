#!/usr/bin/env bash
# The GPU benchmark as one prepared command (bench/bench_gpu.py): our trainer vs TRL's DPOTrainer
# on a ~1B random-init Llama in bf16 with sdpa, full fine-tuning and LoRA, tokens/s, MFU and the
# SPO ratios. Under 8 minutes on one H100/H200. `bench/gpu.sh --smoke` runs the same code on a CPU
# in a reduced mode (CI does, so the script is known to work when a GPU comes).
# Asked for only: `--profile [CONFIG]` (where a step's time goes, by category) and `--sweep` (batch
# 8, 16, ... until out of memory); `bench/gpu.sh --profile --sweep` fits one 10-minute command.
#
# Where the project is installed (`make setup`, a CUDA image): `bench/gpu.sh`.
# On a bare GPU machine with its own torch/transformers/peft/accelerate (the device tool's image),
# carry what it lacks into the repository first (both folders are git-ignored):
#   .bench/data/hh/train.jsonl.gz   a copy of ../shared/data/hh/train.jsonl.gz (the HH sample)
#   .whl/                           wheels of the missing packages (trl, datasets and their
#                                   dependencies, pydantic, pydantic-core, annotated-types,
#                                   typing-inspection, rake-nltk, nltk, stopwords; see
#                                   docs/benchmarks.md for the exact list and the download command)
# and run `bench/gpu.sh` there; the figures land in bench/results/gpu.json (copy it to $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/spo-site .whl/*.whl
  export PYTHONPATH="/tmp/spo-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -f .bench/data/hh/train.jsonl.gz ]; then
  export SPO_SHARED_DATA="${SPO_SHARED_DATA:-$PWD/.bench/data}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
PYTHON=python3
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
exec "$PYTHON" bench/bench_gpu.py "$@"
