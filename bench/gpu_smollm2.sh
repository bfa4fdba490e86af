#!/usr/bin/env bash
# The paper's comparison on a GPU (bench/bench_smollm2.py): DPO vs DPO+SPO on SmolLM2-135M-Instruct,
# full fine-tuning in bf16 autocast, hundreds of steps each, generation and the local reward judge,
# in one command of under 10 minutes. docs/benchmarks.md, "The paper's comparison on a GPU", has the
# plan, the two device calls and the time budget.
#
# The model file (98,362,432 bytes) is more than one device call carries (64 MiB with the working
# tree), so it travels in two halves, one per call, to a machine kept warm between them:
#
#   bench/gpu_smollm2.sh --prepare     here, once (CPU): splits the GGUF into .bench/smollm2/part1 and
#                                      part2 (tools/device_carry.py), and puts the manifest, the data
#                                      stages' outputs (data.tar.gz) and the wheels the device image
#                                      lacks into .bench/smollm2/common (.bench/ is git-ignored)
#   bench/gpu_smollm2.sh [ARGS]        on the device, in each of the two calls: stashes the part this
#                                      call carried in $SPO_CARRY_STASH (/tmp/spo-carry, which lives as
#                                      long as the machine); exits 3 at once while the other part is
#                                      missing; once both are there, joins and checks the sha256, then
#                                      runs the comparison (ARGS go to bench_smollm2.py), figures to $OUT
#   bench/gpu_smollm2.sh --smoke       here (CPU): the whole plan on the real GGUF in a scratch folder
#                                      (split, the two gathers, join, a data bundle) and the same
#                                      comparison with a few steps, pairs and prompts (tests/test_bench_smollm2.py)
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.bench/smollm2
STASH="${SPO_CARRY_STASH:-/tmp/spo-carry}"
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
PART_MIB=48  # two parts of 46.9 MiB: each call carries one, plus common/ and the working tree (< 64 MiB)
WHEELS="pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 gguf==0.19.0"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DVC_NO_ANALYTICS=1
PYTHON=python3
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python

packaged_gguf() {
  "$PYTHON" -c "from spo.models.gguf import SMOLLM2, resolve_packaged; print(resolve_packaged(SMOLLM2).path)"
}

case "${1:-}" in
--prepare)
  shift
  rm -rf "$CARRY" && mkdir -p "$CARRY/common/whl"
  "$PYTHON" tools/device_carry.py split "$(packaged_gguf)" --limit-mib "$PART_MIB" --out "$CARRY"
  mv "$CARRY/manifest.json" "$CARRY/common/manifest.json"
  "$PYTHON" bench/bench_smollm2.py --prepare-data "$CARRY/common/data.tar.gz" "$@"
  # shellcheck disable=SC2086  # one argument per wheel
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/common/whl" $WHEELS
  tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s | awk '{s += $1} END {print s}')
  common=$(du -sb "$CARRY/common" | cut -f1)
  for part in "$CARRY"/part*; do
    size=$(du -sb "$part" | cut -f1)
    echo "call carrying $part: working tree $tree + common $common + part $size = $(( (tree + common + size) / 1048576 )) MiB (limit 64)"
  done
  ;;
--smoke)
  shift
  scratch=$(mktemp -d "${TMPDIR:-/tmp}/spo-smollm2-smoke.XXXXXX")
  trap 'rm -rf "$scratch"' EXIT
  "$PYTHON" tools/device_carry.py split "$(packaged_gguf)" --limit-mib "$PART_MIB" --out "$scratch/carry"
  manifest="$scratch/carry/manifest.json" joined="$scratch/stash/$GGUF_NAME"
  set +e  # the first call finds the other part missing: exit 3, as on the device
  "$PYTHON" tools/device_carry.py gather "$manifest" --from "$scratch/carry/part1" --stash "$scratch/stash" --join "$joined"
  rc=$?
  set -e
  [ "$rc" = 3 ] || { echo "smoke: the first gather should say part 2 is missing (exit 3), got $rc" >&2; exit 1; }
  "$PYTHON" tools/device_carry.py gather "$manifest" --from "$scratch/carry/part2" --stash "$scratch/stash" --join "$joined"
  "$PYTHON" bench/bench_smollm2.py --smoke --prepare-data "$scratch/data.tar.gz"
  "$PYTHON" bench/bench_smollm2.py --smoke --gguf "$joined" --data-bundle "$scratch/data.tar.gz" "$@"
  ;;
*)
  set +e
  "$PYTHON" tools/device_carry.py gather "$CARRY/common/manifest.json" --from "$CARRY" --stash "$STASH" \
    --join "$STASH/$GGUF_NAME"
  rc=$?
  set -e
  if [ "$rc" = 3 ]; then
    echo "gpu_smollm2: this call's part is stashed in $STASH; make the call carrying the other part now," \
         "while this machine is warm (30 s)" >&2
    exit 3
  fi
  [ "$rc" = 0 ] || exit "$rc"
  if ls "$CARRY"/common/whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/spo-site \
      "$CARRY"/common/whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/spo-site"  # what the image lacks (PYTHONPATH comes before site-packages)
  fi
  out="${OUT:-bench/results}"
  mkdir -p "$out"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  set -o pipefail
  "$PYTHON" bench/bench_smollm2.py --gguf "$STASH/$GGUF_NAME" --data-bundle "$CARRY/common/data.tar.gz" \
    --out "$out/smollm2_gpu.json" "$@" 2>&1 | tee "$out/smollm2_gpu.log"
  ;;
esac
