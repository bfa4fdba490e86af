"""Read raw preference rows from a local folder or the Hugging Face hub.

Both paths yield the same ``RawRecord`` stream, each record naming where it came from
(file and line, or hub split and index), so that any later complaint about a row can point
the user at the exact line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spo.config import DATA_DIR_ENV, DataConfig
from spo.errors import InputError
from spo.io import file_sha256, open_text

SOURCE_SPLITS = ("train", "test")


@dataclass
class RawRecord:
    source_split: str
    origin: str
    line: int
    row: dict[str, Any] | None
    error: str | None = None
    text: str | None = None
    blank: bool = False  # a blank or whitespace-only line: no row at all, counted apart (``blank_lines``)


def local_files(folder: Path, dataset: str) -> dict[str, Path]:
    """``{folder}/{dataset}/{train,test}.jsonl[.gz]``; a missing one is an error, not a skip."""
    base = folder / dataset
    if not base.is_dir():
        raise InputError(
            f"{base}: data folder not found (looked for {dataset}/ under {folder}; "
            f"set {DATA_DIR_ENV} or data.local_dir to the folder that holds hh/ and tldr/)"
        )
    files = {}
    for split in SOURCE_SPLITS:
        candidates = [base / f"{split}.jsonl.gz", base / f"{split}.jsonl"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise InputError(f"{candidates[0]}: file not found (nor {candidates[1].name})")
        files[split] = found
    return files


def _read_local(path: Path, origin: str, split: str, limit: int | None) -> Iterator[RawRecord]:
    """``origin`` is the path relative to the data folder, so outputs do not depend on where
    the folder sits on this machine; errors that stop the run name the full path."""
    yielded = 0
    try:
        with open_text(path) as handle:
            for line_no, line in enumerate(handle, start=1):
                if limit is not None and yielded >= limit:
                    return
                if not line.strip():  # a trailing newline or a separator: not a bad row, but counted
                    yield RawRecord(split, origin, line_no, None, text=line, blank=True)
                    continue
                yielded += 1
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    yield RawRecord(split, origin, line_no, None, f"not valid JSON: {err.msg} at column {err.colno}",
                                    line)
                    continue
                if not isinstance(row, dict):
                    yield RawRecord(split, origin, line_no, None, f"a JSON {type(row).__name__}, not an object", line)
                    continue
                yield RawRecord(split, origin, line_no, row)
    except (OSError, EOFError) as err:
        raise InputError(f"{path}: cannot be read ({err})") from None
    if yielded == 0:
        raise InputError(f"{path}: file is empty (no JSON lines)")


def _read_hub(cfg: DataConfig, split: str, limit: int | None) -> Iterator[RawRecord]:
    from datasets import load_dataset  # heavy import, only on the hub path

    source = cfg.hub[cfg.dataset]
    hub_split = source.splits[split]
    dataset = load_dataset(source.path, name=source.name, data_dir=source.data_dir, revision=source.revision,
                           split=hub_split)
    origin = f"hub:{source.path}{'/' + source.name if source.name else ''}[{hub_split}]"
    for index, row in enumerate(dataset, start=1):
        if limit is not None and index > limit:
            return
        yield RawRecord(split, origin, index, dict(row))


def read_raw(cfg: DataConfig) -> tuple[Iterator[RawRecord], dict[str, Any]]:
    """The raw record stream plus a description of the source for provenance."""
    folder = cfg.resolved_local_dir()
    limit = cfg.max_rows_per_split
    if folder is not None:
        files = local_files(folder, cfg.dataset)
        description = {
            "kind": "local",
            "files": {s: {"path": str(p.relative_to(folder)), "sha256": file_sha256(p)} for s, p in files.items()},
        }

        def stream() -> Iterator[RawRecord]:
            for split, path in files.items():
                yield from _read_local(path, str(path.relative_to(folder)), split, limit)

        return stream(), description
    source = cfg.hub[cfg.dataset]
    description = {"kind": "hub", **source.model_dump()}

    def hub_stream() -> Iterator[RawRecord]:
        for split in source.splits:
            yield from _read_hub(cfg, split, limit)

    return hub_stream(), description
