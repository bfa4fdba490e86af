"""SQLite cache of judgments already paid for.

Key: sha256 over (judge model id, prompt version, rendered prompt text).  The rendered text holds both
responses in the order shown, so (a, b) and (b, a) are distinct entries (position bias is measured,
not hidden).  Every verdict is committed the moment it arrives (WAL mode), so a run killed midway
loses nothing and a rerun makes no call for what is already here.  One connection per thread.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path

from spo.judging.base import Verdict

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judgments (
    key TEXT PRIMARY KEY,
    judge_model TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    winner TEXT,
    raw TEXT NOT NULL,
    explanation TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
)
"""


def cache_key(judge_model: str, prompt_version: str, rendered_prompt: str) -> str:
    payload = json.dumps([judge_model, prompt_version, rendered_prompt], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgeCache:
    """Thread-safe: each thread opens its own connection to the same file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        conn = self._conn()
        with conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def get(self, key: str) -> Verdict | None:
        row = self._conn().execute(
            "SELECT winner, raw, explanation, prompt_tokens, completion_tokens FROM judgments WHERE key = ?",
            (key,),
        ).fetchone()
        if row is None:
            return None
        return Verdict(winner=row[0], raw=row[1], explanation=row[2], cached=True,
                       prompt_tokens=row[3], completion_tokens=row[4])

    def put(self, key: str, judge_model: str, prompt_version: str, verdict: Verdict) -> None:
        conn = self._conn()
        with conn:  # commits on exit: the verdict survives a kill right after this line
            conn.execute(
                "INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, judge_model, prompt_version, verdict.winner, verdict.raw, verdict.explanation,
                 verdict.prompt_tokens, verdict.completion_tokens, time.time()),
            )

    def __len__(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM judgments").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()

    def __enter__(self) -> JudgeCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
