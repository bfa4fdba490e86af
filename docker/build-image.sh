#!/usr/bin/env bash
# Build the project image of one flavour, offline, from its wheelhouse (docker/wheelhouse.sh):
#
#   docker/build-image.sh cpu|cuda
#
# Tags: $IMAGE_NAME:$VERSION-<flavour> and the content tag $IMAGE_NAME:<flavour>-<12 hex>, the
# first 12 hex digits of a sha256 over the Dockerfile, constraints.txt, the wheelhouse's file
# names and sizes, the project wheel's bytes and the base image (name and id).  A rebuild with
# other content gets another content tag (KFP's local cache keys on the tag); the same content,
# the same tag.  The content tag is written to build/image-<flavour>.ref.
#
# Environment (the Makefile passes them): DOCKER_HOST, BASE_IMAGE, IMAGE_NAME, VERSION, REVISION,
# IMAGE_SOURCE, DOCKER.
set -euo pipefail
cd "$(dirname "$0")/.."

FLAVOUR=${1:?usage: docker/build-image.sh cpu|cuda}
case $FLAVOUR in
    cpu) DOCKERFILE=docker/Dockerfile ;;
    cuda) DOCKERFILE=docker/Dockerfile.cuda ;;
    *) echo "build-image: unknown flavour '$FLAVOUR' (cpu or cuda)" >&2; exit 2 ;;
esac
DOCKER=${DOCKER:-docker}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
IMAGE_NAME=${IMAGE_NAME:-spo-pipeline}
VERSION=${VERSION:-$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n 1)}
REVISION=${REVISION:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
IMAGE_SOURCE=${IMAGE_SOURCE:-unknown}
WHEELHOUSE=build/wheelhouse/$FLAVOUR
CONTEXT=build/image-context/$FLAVOUR
# The classic builder: multi-stage builds, COPY --from and USER need nothing more, and it honours
# --network=none for every RUN.
export DOCKER_BUILDKIT=0

shopt -s nullglob
project=("$WHEELHOUSE"/spo_pipeline-"$VERSION"-*.whl)
if [[ ${#project[@]} -ne 1 ]]; then
    echo "build-image: no spo_pipeline-$VERSION wheel in $WHEELHOUSE; run make wheelhouse" >&2
    exit 1
fi
if ! "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    if [[ $BASE_IMAGE == spo-base:* ]]; then
        echo "build-image: no $BASE_IMAGE; run make base-image" >&2
        exit 1
    fi
    "$DOCKER" pull -q "$BASE_IMAGE"
fi

# The content tag.
content_sha=$(
    {
        echo "dockerfile $(sha256sum <"$DOCKERFILE" | cut -c1-64)"
        echo "constraints $(sha256sum <constraints.txt | cut -c1-64)"
        echo "project $(sha256sum <"${project[0]}" | cut -c1-64)"
        echo "base $BASE_IMAGE $("$DOCKER" image inspect --format '{{.Id}}' "$BASE_IMAGE")"
        (cd "$WHEELHOUSE" && find . -maxdepth 1 -type f -name '*.whl' -printf '%f %s\n' | LC_ALL=C sort)
    } | sha256sum | cut -c1-12
)
REF=$IMAGE_NAME:$FLAVOUR-$content_sha

# The build context: constraints.txt, wheels/ (dependencies), project/ (the project wheel), as
# hard links into the wheelhouse where the file system allows (no copy of ~0.4 GB).
rm -rf "$CONTEXT"
mkdir -p "$CONTEXT/wheels" "$CONTEXT/project"
cp constraints.txt "$CONTEXT"/
for wheel in "$WHEELHOUSE"/*.whl; do
    target=$CONTEXT/wheels
    [[ $wheel == "${project[0]}" ]] && target=$CONTEXT/project
    ln "$wheel" "$target"/ 2>/dev/null || cp "$wheel" "$target"/
done

echo "build-image: $REF and $IMAGE_NAME:$VERSION-$FLAVOUR from $DOCKERFILE (base $BASE_IMAGE)"
start=$SECONDS
"$DOCKER" build --network=none -f "$DOCKERFILE" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg VERSION="$VERSION" \
    --build-arg REVISION="$REVISION" \
    --build-arg SOURCE="$IMAGE_SOURCE" \
    -t "$REF" -t "$IMAGE_NAME:$VERSION-$FLAVOUR" "$CONTEXT"
echo "$REF" >"build/image-$FLAVOUR.ref"
size=$("$DOCKER" image inspect --format '{{.Size}}' "$REF")
echo "build-image: $REF built in $((SECONDS - start)) s, $((size / 1000000)) MB; wrote build/image-$FLAVOUR.ref"
