#!/usr/bin/env bash
# The GPU benchmark as one prepared command (bench/bench_gpu.py, whose docstring has the details):
# our trainer vs TRL's DPOTrainer on a random-init Llama in bf16 autocast with sdpa, tokens/s, MFU,
# the arithmetic floor and the SPO ratios. A lent GPU gives 15 minutes of device time per task (the
# machine's start included), at most 10 per command: each mode below fits one command, a --budget
# (480 s by default) stops starting new measurements, and the JSON is rewritten after each mode.
#
# Modes (durations on one H100/H200, estimated from the FLOPs, not measured):
#   bench/gpu.sh                          ~1.1B (TinyLlama's shape), every configuration, full and
#                                         LoRA (< 8 min)
#   bench/gpu.sh --check --ablation       ~5 min: each speed option (fused AdamW, flex attention,
#                                         compiled layers, LoRA's frozen-head log-probs) checked equal
#                                         to the default path on one step (~1.5-2 min), then ours dpo
#                                         at batch 32 with each option, spo_m2/spo_all with the
#                                         fastest equal combination, trl_pre, and the issue's targets
#                                         as PASS/FAIL lines (~3-4 min)
#   bench/gpu.sh --model llama8b          ~2-3 min: Llama-3-8B's shape in bf16, LoRA r=16 for dpo,
#                                         spo_m2, trl_pre; full fine-tuning of dpo (activation
#                                         checkpointing) only where 16 bytes/param fit (H200: ~120 GiB
#                                         of 140; on an H100 a "does not fit" row)
#   bench/gpu.sh --profile --sweep        < 10 min: where a step's time goes, by category; batch 8,
#                                         16, ... until out of memory
#   bench/gpu.sh --smoke [...]            the same code on a CPU in a reduced mode (CI runs it, so the
#                                         script is known to work when a GPU comes; figures mean nothing)
#
# The recommended device calls, in this order, each a command of its own:
#   call 1: bench/gpu.sh --check --ablation --out "$OUT/gpu.json"        timeout_s 600
#   call 2: bench/gpu.sh --model llama8b --out "$OUT/gpu_llama8b.json"   timeout_s 420
# (if call 1 took more than ~7 minutes, give call 2 a --budget that fits the device time left).
#
# Where the project is installed (`make setup`, a CUDA image): `bench/gpu.sh`.
# On a bare GPU machine with its own torch/transformers/peft/accelerate (the device tool's image),
# carry what it lacks into the repository first (both folders are git-ignored):
#   .bench/data/hh/train.jsonl.gz   a copy of ../shared/data/hh/train.jsonl.gz (the HH sample)
#   .whl/                           wheels of the missing packages (trl, datasets and their
#                                   dependencies, pydantic, pydantic-core, annotated-types,
#                                   typing-inspection, rake-nltk, nltk, stopwords; see
#                                   docs/benchmarks.md for the exact list and the download command)
# and run `bench/gpu.sh` there; the figures land in bench/results/gpu.json (gpu_llama8b.json for
# llama8b) unless --out names a file under $OUT, as the calls above do.
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
