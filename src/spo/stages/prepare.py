"""Stage ``prepare``: raw HH / TL;DR rows -> normalised ``id, source, prompt, chosen, rejected``.

Every raw row ends up in exactly one place: a split file, or the prepare quarantine with the
file, line and field that made it unusable.  Blank or whitespace-only lines (a trailing newline,
a separator between blocks) hold no row: they are skipped and counted as ``blank_lines``, so
they neither count as bad rows towards ``validate.max_bad_fraction`` nor vanish uncounted.  The
same pair read twice (TL;DR pairs labelled by several workers) is one row: later copies are
merged into the first, which lists them under ``merged`` with their origin and original record,
so the rows stay unique and nothing is lost.
The same pair labelled both ways (annotators who disagree) would train the policy on both
orders at once; ``prepare.disagreement`` settles it by majority, keeps both flagged, or
quarantines it (``resolve_disagreements``).  Content checks (lengths, equal responses, bad
bytes, duplicates) belong to ``validate``; this stage only refuses rows it cannot parse.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from spo.config import SPLITS, SpoConfig
from spo.data.formats import parse, row_id
from spo.data.loading import RawRecord, read_raw
from spo.data.splitting import assign_splits
from spo.io import write_json, write_jsonl, write_provenance

log = logging.getLogger("spo.prepare")


def run(cfg: SpoConfig) -> dict[str, Any]:
    """Read every raw record once, settle pairs labelled both ways, assign splits by prompt group,
    write the split files, the quarantine and a summary whose counts add up to the rows read."""
    started = time.perf_counter()
    source = cfg.data.dataset
    records, description = read_raw(cfg.data)
    found = _read_records(records, source, keep_divergent=cfg.prepare.hh_divergence == "keep")
    rows, outvoted, disputed_out = resolve_disagreements(found.rows, found.by_id, found.disputed,
                                                         cfg.prepare.disagreement)
    quarantined = found.quarantined + disputed_out
    merged = sum(len(row.get("merged", ())) for row in rows)  # repeats of an outvoted or quarantined pair went with it

    splits = assign_splits([r["group"] for r in rows], [r["source_split"] for r in rows], cfg.prepare.split)
    out_dir = Path(cfg.prepare.out_dir)
    counts = Counter(splits)
    for split in SPLITS:
        write_jsonl(out_dir / f"{split}.jsonl", ({**row, "split": s} for row, s in zip(rows, splits) if s == split))
    write_jsonl(cfg.prepare.quarantine_file, quarantined)
    summary = {
        "rows_read": found.read,
        "blank_lines": found.blank_lines,
        "rows_prepared": len(rows),
        "rows_merged": merged,
        "rows_outvoted": outvoted,
        "rows_quarantined": len(quarantined),
        "pairs_disagreeing": len(found.disputed),
        "splits": {s: counts.get(s, 0) for s in SPLITS},
        "quarantined_by_field": dict(Counter(r["field"] for q in quarantined for r in q["reasons"])),
        "source": description,
    }
    write_json(out_dir / "summary.json", summary)
    write_provenance(out_dir, stage="prepare", config_hash=cfg.section_hash("data", "prepare"), inputs=description)
    seconds = time.perf_counter() - started
    log.info(
        "prepare: read %d %s rows from %s (skipped %d blank lines), wrote %s to %s, merged %d repeated pairs, "
        "settled %d pairs labelled both ways (%s, %d copies outvoted), quarantined %d to %s (%.1f s)",
        found.read, source, cfg.data.resolved_local_dir() or description.get("path"), found.blank_lines,
        " / ".join(f"{counts.get(s, 0)} {s}" for s in SPLITS), out_dir, merged, len(found.disputed),
        cfg.prepare.disagreement, outvoted, len(quarantined), cfg.prepare.quarantine_file, seconds,
    )
    return {**summary, "seconds": round(seconds, 3)}


@dataclass
class _Found:
    """One pass over the raw records: the unique pairs in reading order (``by_id`` indexes the same
    dicts, so a later copy is merged into its first), the quarantine so far, the pairs read in both
    orders (their ids, first order first), and the counts the summary reports."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    by_id: dict[str, dict[str, Any]] = field(default_factory=dict)
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    disputed: list[list[str]] = field(default_factory=list)
    read: int = 0
    blank_lines: int = 0


def _read_records(records: Iterable[RawRecord], source: str, keep_divergent: bool) -> _Found:
    """Parse each record into a normalised row, or quarantine it with the reasons it cannot be used.

    Blank lines are counted apart (they hold no row); a pair read again is merged into its first
    copy with its origin and original record, so nothing is lost and ids stay unique.
    """
    found = _Found()
    orders: dict[str, list[str]] = {}  # unordered pair -> the ids of the orders it was read in
    for record in tqdm(records, desc="prepare", unit=" rows", leave=False, disable=None):
        if record.blank:
            found.blank_lines += 1
            continue
        found.read += 1
        where = {"origin": record.origin, "line": record.line, "source_split": record.source_split}
        if record.row is None:
            found.quarantined.append(
                {**where, "reasons": [{"field": "<line>", "reason": record.error}], "raw": record.text})
            continue
        parsed = parse(source, record.row, keep_divergent)
        if parsed.problems:
            found.quarantined.append({**where, "reasons": [p.as_dict() for p in parsed.problems], "raw": record.row})
            continue
        pair_id = row_id(source, parsed.prompt, parsed.chosen, parsed.rejected)
        if pair_id in found.by_id:
            found.by_id[pair_id].setdefault("merged", []).append({**where, "original": record.row})
            continue
        orders.setdefault(row_id(source, parsed.prompt, *sorted((parsed.chosen, parsed.rejected))), []).append(pair_id)
        found.by_id[pair_id] = {
            "id": pair_id,
            "source": source,
            "prompt": parsed.prompt,
            "chosen": parsed.chosen,
            "rejected": parsed.rejected,
            "group": parsed.group,
            **parsed.extra,
            **where,
            "original": record.row,
        }
        found.rows.append(found.by_id[pair_id])
    found.disputed = [ids for ids in orders.values() if len(ids) > 1]
    return found


def _copies(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Every raw copy a prepared row stands for: itself, then the repeats merged into it."""
    first = {k: row[k] for k in ("origin", "line", "source_split", "original")}
    return [first, *row.get("merged", [])]


def _copies_word(n: int) -> str:
    return f"{n} {'copy' if n == 1 else 'copies'}"


def resolve_disagreements(
    rows: list[dict[str, Any]], by_id: dict[str, dict[str, Any]], disputed: list[list[str]], mode: str
) -> tuple[list[dict[str, Any]], int, list[dict[str, Any]]]:
    """Settle pairs read in both orders: (rows kept, raw copies outvoted, quarantine entries).

    Each raw copy is one annotator's vote.  ``majority`` keeps the order with more votes and
    lists the other order's copies under ``outvoted`` (counted in ``rows_outvoted``); a tie, or
    ``quarantine``, sends every copy of both orders to the quarantine with the vote count;
    ``keep`` keeps both rows, each with ``disagreement: {other_id, votes_for, votes_against}``.
    """
    drop: set[str] = set()
    outvoted = 0
    quarantine: list[dict[str, Any]] = []
    for first_id, second_id in disputed:
        a, b = by_id[first_id], by_id[second_id]
        votes_a, votes_b = len(_copies(a)), len(_copies(b))
        if mode == "keep":
            a["disagreement"] = {"other_id": second_id, "votes_for": votes_a, "votes_against": votes_b}
            b["disagreement"] = {"other_id": first_id, "votes_for": votes_b, "votes_against": votes_a}
            continue
        if mode == "majority" and votes_a != votes_b:
            winner, loser = (a, b) if votes_a > votes_b else (b, a)
            winner["outvoted"] = [{**copy, "id": loser["id"]} for copy in _copies(loser)]
            winner["disagreement"] = {"other_id": loser["id"], "votes_for": max(votes_a, votes_b),
                                      "votes_against": min(votes_a, votes_b)}
            outvoted += len(winner["outvoted"])
            drop.add(loser["id"])
            continue
        why = "a tie" if mode == "majority" else "prepare.disagreement is quarantine"
        for row, other, votes_for, votes_against in ((a, b, votes_a, votes_b), (b, a, votes_b, votes_a)):
            reason = (f"annotators disagree: {_copies_word(votes_for)} prefer this order and "
                      f"{_copies_word(votes_against)} the other (id {other['id']}): {why}")
            for copy in _copies(row):
                quarantine.append({"origin": copy["origin"], "line": copy["line"],
                                   "source_split": copy["source_split"],
                                   "reasons": [{"field": "chosen/rejected", "reason": reason}],
                                   "raw": copy["original"]})
        drop.update((a["id"], b["id"]))
    return [r for r in rows if r["id"] not in drop], outvoted, quarantine
