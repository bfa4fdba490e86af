"""File helpers shared by every stage: JSONL in and out, atomic writes, provenance records.

Writes go to a temporary file that is renamed into place, so an interrupted stage never
leaves a half-written artifact that DVC or the next stage would take for a finished one.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from spo.errors import InputError, OutputError

PROVENANCE_FILE = "provenance.json"
_UMASK = os.umask(0)
os.umask(_UMASK)
_TRACKED_PACKAGES = ("spo-pipeline", "great-expectations", "rake-nltk", "yake", "networkx", "datasets", "pydantic")


_FULL_ERRNOS = {errno.ENOSPC: "ENOSPC", errno.EDQUOT: "EDQUOT"}
# what libraries that hide the errno say instead (torch's C++ writer, safetensors' Rust one)
_FULL_TEXT = re.compile(r"No space left on device|os error 28|StorageFull|Disk quota exceeded|os error 122", re.I)
LOW_SPACE_BYTES = 1 << 20


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def disk_full(err: BaseException, path: str | Path) -> str | None:
    """The errno's name, "ENOSPC" or "EDQUOT", when ``err`` (or what caused it) says the disk is full, or when it is a
    write error of a library that drops the errno (torch.save says "iostream error") while the
    file system of ``path`` has under 1 MiB left; else None."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return _FULL_ERRNOS[current.errno]
        if _FULL_TEXT.search(str(current)):
            return "ENOSPC"
        current = current.__cause__ or current.__context__
    if isinstance(err, (OSError, RuntimeError)):
        free = _free_bytes(Path(path))
        if free is not None and free < LOW_SPACE_BYTES:
            return "ENOSPC"
    return None


def output_error(path: str | Path, code: str, what: str = "cannot write it", hint: str = "") -> OutputError:
    path = Path(path)
    free = _free_bytes(path)
    left = f", {free // 1024} KiB free" if free is not None else ""
    strerror = os.strerror(errno.EDQUOT if code == "EDQUOT" else errno.ENOSPC)
    return OutputError(f"{path}: {what}: {strerror} ({code}{left}); free some space and rerun{hint}", code)


def open_text(path: Path) -> IO[str]:
    """Open .jsonl or .jsonl.gz for reading.

    ``surrogateescape`` keeps invalid UTF-8 bytes as lone surrogates instead of failing the
    whole file, so the row can be quarantined with its reason by validation. ``utf-8-sig``
    drops a byte-order mark at the start of the file (editors on Windows write one), which
    would otherwise make the first row invalid JSON.
    """
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="\n")
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file this project wrote; a bad line here is a bug, so it raises."""
    path = Path(path)
    rows = []
    with open_text(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
    return rows


def dumps(row: Any) -> str:
    """One JSON line; ASCII-escaped so lone surrogates from bad bytes survive the round trip."""
    return json.dumps(row, ensure_ascii=True, separators=(",", ":"))


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        code = disk_full(err, path)
        if code is None:
            raise
        raise output_error(path, code, hint=" (the previous file, if any, is unchanged)") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A folder output whole or not at all: the block writes into a sibling temporary folder,
    which replaces ``path`` only when the block completes. A killed run leaves the previous
    folder as it was (never some files of each run), and its temporary folder is removed by the
    next run into the same place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a run that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        old = path.parent / f".{path.name}.tmp-old-{os.getpid()}"
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, OutputError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        code = err.code if isinstance(err, OutputError) else disk_full(err, path)
        if code is None:
            raise
        # name the output folder, not the temporary one the file was written in
        raise output_error(path, code, hint=" (the previous folder, if any, is unchanged)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> int:
    count = 0
    with atomic_open(path) as handle:
        for row in rows:
            handle.write(dumps(row))
            handle.write("\n")
            count += 1
    return count


def check_aligned(
    rows_path: str | Path, rows: list[dict[str, Any]], other_path: str | Path, other: list[dict[str, Any]],
    what: str, hint: str = "",
) -> None:
    """Per-row side files (keywords, degrees) must follow the rows line by line, by id.

    A mismatch means a stale artifact; joining by position would silently pair a response
    with another row's phrases, so it stops the stage naming both files, the line and the ids.
    """
    for line, (row, entry) in enumerate(zip(rows, other), start=1):
        if row.get("id") is None or row.get("id") != entry.get("id"):
            raise InputError(
                f"{other_path}:{line} does not match {rows_path}:{line}: "
                f"{what} id {entry.get('id')!r} != row id {row.get('id')!r}{hint}"
            )
    if len(rows) != len(other):
        line = min(len(rows), len(other)) + 1
        row_id = rows[line - 1].get("id") if len(rows) >= line else "<missing>"
        other_id = other[line - 1].get("id") if len(other) >= line else "<missing>"
        raise InputError(
            f"{other_path} has {len(other)} lines but {rows_path} has {len(rows)} rows: "
            f"at line {line} {what} id {other_id!r}, row id {row_id!r}"
        )


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> None:
    """Save a matplotlib figure atomically (a half-written PNG must never look finished)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=dpi)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        code = disk_full(err, path)
        if code is None:
            raise
        raise output_error(path, code, hint=" (the previous file, if any, is unchanged)") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, payload: Any) -> None:
    with atomic_open(path) as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, ensure_ascii=False)
        handle.write("\n")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_sha256(path: str | Path) -> dict[str, str]:
    """sha256 of every file under a folder (or of a single file), keyed by relative path."""
    path = Path(path)
    if path.is_file():
        return {path.name: file_sha256(path)}
    return {
        str(p.relative_to(path)): file_sha256(p)
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != PROVENANCE_FILE
    }


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_provenance(out_dir: str | Path, *, stage: str, config_hash: str, inputs: dict[str, Any]) -> None:
    """Record how an output was made, without timestamps so the record is reproducible.

    DVC hashes output folders; a wall-clock time in here would make every rerun look like a
    change and needlessly invalidate everything downstream.
    """
    write_json(
        Path(out_dir) / PROVENANCE_FILE,
        {
            "stage": stage,
            "config_hash": config_hash,
            "inputs": inputs,
            "packages": package_versions(),
        },
    )
