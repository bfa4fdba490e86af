"""Key-phrase extraction over many rows, in-process or on a fork pool started once.

Each worker builds its extractor once (pool initializer) and turns a chunk of
``(id, chosen, rejected)`` rows into finished JSON lines plus small per-response statistics,
so the parent only writes strings.  Results come back in input order; with the random
method the draw depends only on (seed, text), so the output is the same for any worker count.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from spo.io import dumps
from spo.keywords import get_extractor
from spo.keywords.base import Extractor, json_str

Row = tuple[Any, str, str]  # (id, chosen, rejected)
# per response: (number of phrases, characters covered by the union of spans, text length)
Stat = tuple[int, int, int]

_WORKER: tuple[str, Extractor] | None = None


def process_rows(method: str, extractor: Extractor, rows: Sequence[Row]) -> tuple[list[str], list[Stat]]:
    """JSON lines and per-response statistics of a chunk of rows.

    The line is assembled from ``extractor.extract_json`` fragments rather than by ``dumps`` of
    a dict of phrase dicts (the same bytes; see ``phrases_json``), which is what keeps the
    stage close to the bare extraction speed.
    """
    lines: list[str] = []
    stats: list[Stat] = []
    extract_json = extractor.extract_json
    method_json = dumps(method)
    for row_id, chosen, rejected in rows:
        json_c, n_c, cov_c = extract_json(chosen)
        json_r, n_r, cov_r = extract_json(rejected)
        id_json = json_str(row_id) if type(row_id) is str else dumps(row_id)
        lines.append(f'{{"id":{id_json},"method":{method_json},"chosen":{json_c},"rejected":{json_r}}}')
        stats.append((n_c, cov_c, len(chosen)))
        stats.append((n_r, cov_r, len(rejected)))
    return lines, stats


def _init_worker(method: str, options: dict[str, Any]) -> None:
    global _WORKER
    _WORKER = (method, get_extractor(method, **options))


def _work(rows: Sequence[Row]) -> tuple[list[str], list[Stat]]:
    assert _WORKER is not None, "worker not initialised"
    method, extractor = _WORKER
    return process_rows(method, extractor, rows)


def resolve_workers(workers: int) -> int:
    return workers if workers > 0 else (os.cpu_count() or 1)


class KeywordRunner:
    """Runs one extractor over rows; ``workers > 1`` starts a fork pool once, at construction."""

    def __init__(self, method: str, options: dict[str, Any], workers: int = 1, chunk_size: int = 64) -> None:
        self.method = method
        self.options = dict(options)
        self.workers = resolve_workers(workers)
        self.chunk_size = max(1, chunk_size)
        self._pool = None
        # built here first, in the parent: a bad option (an unknown stop-word language, a missing
        # file) raises once, instead of failing every worker the pool then respawns forever
        self._extractor: Extractor = get_extractor(method, **self.options)
        if self.workers > 1:
            ctx = mp.get_context("fork")
            self._pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(method, self.options))

    def run(
        self, rows: Sequence[Row], progress: Callable[[int], Any] | None = None
    ) -> Iterator[tuple[list[str], list[Stat]]]:
        """Yield (json lines, stats) chunk by chunk, in input order."""
        chunks = [rows[i : i + self.chunk_size] for i in range(0, len(rows), self.chunk_size)]
        if self._pool is None:
            results: Iterator = (process_rows(self.method, self._extractor, c) for c in chunks)
        else:
            results = self._pool.imap(_work, chunks)
        for chunk, result in zip(chunks, results):
            if progress is not None:
                progress(len(chunk))
            yield result

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> KeywordRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None and exc[0] is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        self.close()
