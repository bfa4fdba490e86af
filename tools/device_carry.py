#!/usr/bin/env python3
"""Carry a file larger than one device call allows: split it into parts, rejoin and verify them.

The device tool carries at most 64 MiB a call (the working tree included), and the machine keeps
what a call wrote outside ``$OUT`` only while it stays warm between calls (docs/benchmarks.md,
"The paper's comparison on a GPU"). So a larger file (SmolLM2's 98 MB GGUF) travels as parts,
one per call, each with its sha256 in a manifest:

    python3 tools/device_carry.py split FILE --limit-mib 48 --out DIR
        DIR/part1/<name>.part1, DIR/part2/<name>.part2, ... (one folder per call's ``carry``)
        and DIR/manifest.json: the file's name, size and sha256, each part's name, size, sha256
    python3 tools/device_carry.py gather MANIFEST --from DIR [--from DIR ...] --stash STASH [--join FILE]
        copies every part found under the --from folders into STASH (checked against the
        manifest), then: all parts there -> join them into FILE and check the whole file's sha256
        (exit 0); some missing -> say which (exit 3), so the next call can bring them
    python3 tools/device_carry.py join MANIFEST --parts DIR --out FILE

Standard library only: it runs on the bare device machine's own python3. A missing part, a
part of the wrong size or sha256, and a joined file that does not match are each an error that
names the part (or the file) and the manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

MANIFEST = "manifest.json"
CHUNK = 1 << 20
EXIT_MISSING = 3  # gather: parts still missing (bring them in the next call); not a failure of the data


class CarryError(Exception):
    """A part or the joined file is missing or does not match the manifest."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def part_name(name: str, index: int) -> str:
    return f"{name}.part{index}"


def split_file(path: str | Path, out_dir: str | Path, limit_bytes: int) -> dict:
    """Split ``path`` into the fewest equal-sized parts of at most ``limit_bytes`` each, as
    ``out_dir/part<i>/<name>.part<i>``, and write ``out_dir/manifest.json``; returns the manifest."""
    path, out_dir = Path(path), Path(out_dir)
    if limit_bytes <= 0:
        raise ValueError("limit_bytes must be positive")
    size = path.stat().st_size
    count = max(1, -(-size // limit_bytes))
    part_size = -(-size // count)  # equal parts: each call carries about the same
    parts = []
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(path, "rb") as source:
        for index in range(1, count + 1):
            folder = out_dir / f"part{index}"
            folder.mkdir(exist_ok=True)
            target = folder / part_name(path.name, index)
            digest, written = hashlib.sha256(), 0
            with open(target, "wb") as sink:
                while written < part_size:
                    block = source.read(min(CHUNK, part_size - written))
                    if not block:
                        break
                    sink.write(block)
                    digest.update(block)
                    written += len(block)
            parts.append({"index": index, "name": target.name, "size": written, "sha256": digest.hexdigest()})
    manifest = {"file": path.name, "size": size, "sha256": sha256_of(path), "parts": parts,
                "limit_bytes": limit_bytes}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CarryError(f"{path}: manifest not found") from None
    except ValueError as err:
        raise CarryError(f"{path}: not a valid manifest ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("parts"), list):
        raise CarryError(f"{path}: not a valid manifest (no parts list)")
    return manifest


def describe(part: dict, total: int) -> str:
    return f"part {part['index']} of {total} ({part['name']}, {part['size']} bytes, sha256 {part['sha256'][:12]}…)"


def check_part(path: Path, part: dict, total: int) -> None:
    """CarryError naming the part when ``path`` is not it (size first: cheap)."""
    if not path.is_file():
        raise CarryError(f"{describe(part, total)} is missing: {path} not found")
    size = path.stat().st_size
    if size != part["size"]:
        raise CarryError(f"{describe(part, total)} is corrupt: {path} has {size} bytes")
    found = sha256_of(path)
    if found != part["sha256"]:
        raise CarryError(f"{describe(part, total)} is corrupt: {path} has sha256 {found}")


def find_part(part: dict, dirs: list[Path]) -> Path | None:
    """The part's file under one of ``dirs`` (directly, or in its ``part<i>`` folder)."""
    for folder in dirs:
        for candidate in (folder / part["name"], folder / f"part{part['index']}" / part["name"]):
            if candidate.is_file():
                return candidate
    return None


def join_parts(manifest_path: str | Path, parts_dirs: list[str | Path], out: str | Path) -> Path:
    """Check every part, concatenate them into ``out`` (written beside it, then renamed) and check
    the whole file's size and sha256; CarryError naming the first missing or corrupt part."""
    manifest = read_manifest(manifest_path)
    dirs = [Path(d) for d in parts_dirs]
    total = len(manifest["parts"])
    found = []
    for part in manifest["parts"]:
        path = find_part(part, dirs)
        if path is None:
            raise CarryError(f"{describe(part, total)} is missing: not in {', '.join(map(str, dirs))} "
                             f"(manifest {manifest_path})")
        check_part(path, part, total)
        found.append(path)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".joining")
    with open(partial, "wb") as sink:
        for path in found:
            with open(path, "rb") as source:
                shutil.copyfileobj(source, sink, CHUNK)
    size, digest = partial.stat().st_size, sha256_of(partial)
    if size != manifest["size"] or digest != manifest["sha256"]:
        partial.unlink()
        raise CarryError(f"{out}: the joined parts do not make {manifest['file']} ({size} bytes, sha256 {digest}; "
                         f"the manifest says {manifest['size']} bytes, sha256 {manifest['sha256']})")
    os.replace(partial, out)
    return out


def gather(manifest_path: str | Path, from_dirs: list[str | Path], stash: str | Path) -> list[dict]:
    """Copy each part found under ``from_dirs`` into ``stash`` (checked first: a corrupt carried
    part is an error, never stashed); returns the parts still missing from the stash."""
    manifest = read_manifest(manifest_path)
    stash = Path(stash)
    stash.mkdir(parents=True, exist_ok=True)
    total = len(manifest["parts"])
    missing = []
    for part in manifest["parts"]:
        target = stash / part["name"]
        carried = find_part(part, [Path(d) for d in from_dirs])
        if carried is not None and carried.resolve() != target.resolve():
            check_part(carried, part, total)
            shutil.copyfile(carried, target.with_name(target.name + ".copying"))
            os.replace(target.with_name(target.name + ".copying"), target)
        if not target.is_file():
            missing.append(part)
            continue
        try:
            check_part(target, part, total)
        except CarryError:  # a stale or broken earlier copy: as good as missing
            target.unlink()
            missing.append(part)
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("split", help="split FILE into parts of at most --limit-mib, with a manifest")
    p.add_argument("file", type=Path)
    p.add_argument("--limit-mib", type=float, required=True)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("gather", help="stash the carried parts; join when all are there (exit 3: some missing)")
    p.add_argument("manifest", type=Path)
    p.add_argument("--from", dest="from_dirs", type=Path, action="append", default=[])
    p.add_argument("--stash", type=Path, required=True)
    p.add_argument("--join", type=Path, help="the file to join the parts into once all are stashed")
    p = sub.add_parser("join", help="join the parts (found under --parts) into --out, verified")
    p.add_argument("manifest", type=Path)
    p.add_argument("--parts", type=Path, action="append", required=True)
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "split":
            manifest = split_file(args.file, args.out, int(args.limit_mib * 2**20))
            for part in manifest["parts"]:
                print(f"part {part['index']}: {args.out}/part{part['index']}/{part['name']} "
                      f"{part['size']} bytes sha256 {part['sha256']}")
            print(f"manifest: {args.out / MANIFEST} ({manifest['file']}, {manifest['size']} bytes)")
        elif args.command == "gather":
            missing = gather(args.manifest, args.from_dirs, args.stash)
            if missing:
                total = len(read_manifest(args.manifest)["parts"])
                for part in missing:
                    print(f"device_carry: {describe(part, total)} is not here yet: carry it in the next call "
                          f"(while this machine is warm)", file=sys.stderr)
                return EXIT_MISSING
            if args.join:
                out = join_parts(args.manifest, [args.stash], args.join)
                print(f"device_carry: all parts here; joined and verified {out}")
            else:
                print(f"device_carry: all parts here, in {args.stash}")
        else:
            out = join_parts(args.manifest, args.parts, args.out)
            print(f"device_carry: joined and verified {out}")
    except CarryError as err:
        print(f"device_carry: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
