"""Build the items of a comparison ``a`` vs ``b`` and the judge requests for them.

A side is either ``chosen`` (the data set's preferred response of the row with that id, looked
up in every split file of ``judge.rows_dir`` — ids are content hashes, unique across splits, so
whichever split the generations came from is matched) or a generation name, read from
``{generations_dir}/{name}.jsonl`` (lines ``{"id", "prompt", "response", "sample", "model", ...}``;
only sample 0 is used, a line without ``sample`` counts as sample 0).  The items are the ids
present on both sides, in the order of side a; ids on one side only are counted and logged.

Each item is judged in both orders: request ``2 i`` shows a first (order "ab"), request
``2 i + 1`` shows b first (order "ba").  The task is ``dialogue`` for HH rows and
``summarization`` for TL;DR rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spo.config import ComparisonConfig, JudgeConfig
from spo.errors import InputError
from spo.io import read_jsonl
from spo.judging.base import JudgeRequest

log = logging.getLogger("spo.judge")
DATASET_SIDES = ("chosen", "rejected")  # sides read from the rows instead of a generation file
TASK_BY_SOURCE = {"hh": "dialogue", "tldr": "summarization"}
SAMPLE = 0


@dataclass(frozen=True)
class Item:
    id: str
    prompt: str
    source: str
    response_a: str
    response_b: str
    reference: str | None  # the row's chosen response (ROUGE reference), None if the row is unknown

    @property
    def task(self) -> str:
        return TASK_BY_SOURCE[self.source]


@dataclass
class Comparison:
    name: str
    a: str
    b: str
    items: list[Item]
    only_a: int = 0  # ids present on side a only
    only_b: int = 0
    files: dict[str, str] = field(default_factory=dict)  # side name -> file read

    @property
    def sources(self) -> set[str]:
        return {item.source for item in self.items}


ROW_SPLIT_ORDER = ("test", "eval", "train")  # generations come from the test split by default


def load_rows(
    rows_dir: str | Path, needed: set[str] | None = None
) -> tuple[dict[str, dict[str, Any]], list[Path]]:
    """Rows keyed by id (+ the files read), split files in the order test, eval, train.

    With ``needed`` (the ids of the generation sides), reading stops once every needed id is
    found, so a comparison on test prompts never parses the large train file.
    """
    rows_dir = Path(rows_dir)
    rows: dict[str, dict[str, Any]] = {}
    files = []
    for split in ROW_SPLIT_ORDER:
        if needed is not None and needed.issubset(rows):
            break
        path = rows_dir / f"{split}.jsonl"
        if not path.is_file():
            continue
        files.append(path)
        for row in read_jsonl(path):
            rows.setdefault(row["id"], row)
    return rows, files


def needed_ids(comparisons: list[ComparisonConfig], cfg: JudgeConfig) -> set[str] | None:
    """Ids of every generation side; None when a comparison has dataset rows on both sides (all rows)."""
    ids: set[str] = set()
    for comp in comparisons:
        generated = [side for side in (comp.a, comp.b) if side not in DATASET_SIDES]
        if not generated:
            return None
        for side in generated:
            path = generation_path(cfg.generations_dir, side)
            if path.is_file():
                ids.update(load_generations(path))
    return ids


def generation_path(generations_dir: str | Path, name: str) -> Path:
    return Path(generations_dir) / f"{name}.jsonl"


def load_generations(path: Path) -> dict[str, dict[str, Any]]:
    """Sample 0 of every id in a generation file (first line wins on duplicates)."""
    if not path.is_file():
        raise InputError(f"{path}: generation file not found (run the generate stage, or fix judge.comparisons)")
    out: dict[str, dict[str, Any]] = {}
    for line_no, line in enumerate(read_jsonl(path), start=1):
        if int(line.get("sample", SAMPLE) or 0) != SAMPLE:
            continue
        for key in ("id", "response"):
            if not isinstance(line.get(key), str):
                raise InputError(f"{path}:{line_no}: field {key!r} must be a string")
        out.setdefault(line["id"], line)
    return out


def _side(name: str, cfg: JudgeConfig, rows: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], str]:
    """id -> {"response", "prompt", "source"} for one side, and the file it came from."""
    if name in DATASET_SIDES:
        if not rows:
            raise InputError(f"{cfg.rows_dir}: no split file found, needed for side {name!r}")
        side = {
            rid: {"response": row[name], "prompt": row["prompt"], "source": row.get("source")}
            for rid, row in rows.items()
        }
        return side, str(cfg.rows_dir)
    path = generation_path(cfg.generations_dir, name)
    side = {
        gid: {"response": g["response"], "prompt": g.get("prompt"), "source": g.get("source")}
        for gid, g in load_generations(path).items()
    }
    return side, str(path)


def build_comparison(
    comp: ComparisonConfig, cfg: JudgeConfig, rows: dict[str, dict[str, Any]], default_source: str
) -> Comparison:
    side_a, file_a = _side(comp.a, cfg, rows)
    side_b, file_b = _side(comp.b, cfg, rows)
    # A dataset side covers every row; iterate the generation side so item order follows it.
    order = list(side_a) if comp.a not in DATASET_SIDES or comp.b in DATASET_SIDES else list(side_b)
    common = [i for i in order if i in side_a and i in side_b]
    only_a = sum(1 for i in side_a if i not in side_b) if comp.a not in DATASET_SIDES else 0
    only_b = sum(1 for i in side_b if i not in side_a) if comp.b not in DATASET_SIDES else 0
    items = []
    for item_id in common:
        row = rows.get(item_id, {})
        a, b = side_a[item_id], side_b[item_id]
        prompt = row.get("prompt") or a.get("prompt") or b.get("prompt")
        if not isinstance(prompt, str):
            raise InputError(f"comparison {comp.name}: id {item_id} has no prompt (no row and none in the generations)")
        source = row.get("source") or a.get("source") or b.get("source") or default_source
        if source not in TASK_BY_SOURCE:
            raise InputError(f"comparison {comp.name}: id {item_id} has unknown source {source!r}")
        items.append(Item(
            id=item_id, prompt=prompt, source=source, response_a=a["response"], response_b=b["response"],
            reference=row.get("chosen"),
        ))
    if only_a or only_b:
        log.warning(
            "%s: %d ids only in %s (%s), %d only in %s (%s); judging the %d ids on both sides",
            comp.name, only_a, comp.a, file_a, only_b, comp.b, file_b, len(items),
        )
    return Comparison(comp.name, comp.a, comp.b, items, only_a, only_b, {comp.a: file_a, comp.b: file_b})


def requests_for(items: list[Item]) -> list[JudgeRequest]:
    """Two requests per item: [a first, b first] for item 0, then item 1, ..."""
    out = []
    for item in items:
        out.append(JudgeRequest(item.prompt, item.response_a, item.response_b, item.task))
        out.append(JudgeRequest(item.prompt, item.response_b, item.response_a, item.task))
    return out
