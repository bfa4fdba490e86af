#!/usr/bin/env bash
# The local base image spo-base:bookworm, for machines that reach no image registry: Debian
# bookworm's python3 (3.11) from the Debian mirror apt is configured with, via debootstrap, then
# `docker import`.  Skipped when the tag exists.  Elsewhere the images build FROM
# python:3.11-slim-bookworm instead (docs/images.md).
#
#   docker/base-image.sh            # needs root, debootstrap and a daemon at $DOCKER_HOST
#   MIRROR=http://... BASE_TAG=... docker/base-image.sh
set -euo pipefail

BASE_TAG=${BASE_TAG:-spo-base:bookworm}
SUITE=${SUITE:-bookworm}
DOCKER=${DOCKER:-docker}

if "$DOCKER" image inspect "$BASE_TAG" >/dev/null 2>&1; then
    echo "base-image: $BASE_TAG exists, skipped"
    exit 0
fi

# The mirror apt already uses for $SUITE: a one-line `deb URI SUITE ...` in sources.list(.d)/*.list,
# or a deb822 stanza in sources.list.d/*.sources whose Suites has $SUITE (not bookworm-security).
apt_mirror() {
    local file
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $file ]] || continue
        awk -v suite="$SUITE" '
            $1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                          if ($(i + 1) == suite) { print $i; exit } }' "$file"
    done
    for file in /etc/apt/sources.list.d/*.sources; do
        [[ -f $file ]] || continue
        awk -v suite="$SUITE" '
            function flush() { if (deb && ok && uri != "") { print uri; found = 1; exit }
                               deb = 0; ok = 0; uri = "" }
            /^[ \t]*$/ { flush(); next }
            /^#/ { next }
            tolower($1) == "types:" { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
            tolower($1) == "uris:" { uri = $2 }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == suite) ok = 1 }
            tolower($1) == "enabled:" && tolower($2) == "no" { deb = 0 }
            END { if (!found) flush() }' "$file"
    done
}
MIRROR=${MIRROR:-$(apt_mirror | head -n 1)}
if [[ -z $MIRROR ]]; then
    echo "base-image: no Debian mirror for $SUITE found in /etc/apt/sources.list(.d); set MIRROR" >&2
    exit 1
fi

ROOTFS=$(mktemp -d "${TMPDIR:-/tmp}/spo-base-rootfs.XXXXXX")
cleanup() { rm -rf --one-file-system "$ROOTFS"; }
trap cleanup EXIT

echo "base-image: debootstrap $SUITE from $MIRROR into $ROOTFS"
start=$SECONDS
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || {
    tail -n 30 "$ROOTFS.log" >&2; rm -f "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"
# Slim, as Debian's own -slim images: no package lists or downloaded .debs (apt works again after
# `apt-get update`), no man pages, info or translations; of /usr/share/doc only the copyright files.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/log/*.log \
    "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/usr/share/locale/*
find "$ROOTFS"/usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
find "$ROOTFS"/usr/share/doc -mindepth 1 -type d -empty -delete
tar -C "$ROOTFS" --numeric-owner -c . | "$DOCKER" import \
    --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' \
    --message "debootstrap --variant=minbase $SUITE $MIRROR" - "$BASE_TAG" >/dev/null
echo "base-image: $BASE_TAG built in $((SECONDS - start)) s ($("$DOCKER" image inspect --format '{{.Size}}' "$BASE_TAG") bytes)"
