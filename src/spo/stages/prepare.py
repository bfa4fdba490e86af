"""Stage ``prepare``: raw HH / TL;DR rows -> normalised ``id, source, prompt, chosen, rejected``.

Every raw row ends up in exactly one place: a split file, or the prepare quarantine with the
file, line and field that made it unusable.  The same pair read twice (TL;DR pairs labelled by
several workers) is one row: later copies are merged into the first, which lists them under
``merged`` with their origin and original record, so the rows stay unique and nothing is lost.  Content checks (lengths, equal responses, bad
bytes, duplicates) belong to ``validate``; this stage only refuses rows it cannot parse.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from spo.config import SPLITS, SpoConfig
from spo.data.formats import parse, row_id
from spo.data.loading import read_raw
from spo.data.splitting import assign_splits
from spo.io import write_json, write_jsonl, write_provenance

log = logging.getLogger("spo.prepare")


def run(cfg: SpoConfig) -> dict[str, Any]:
    started = time.perf_counter()
    source = cfg.data.dataset
    keep_divergent = cfg.prepare.hh_divergence == "keep"
    records, description = read_raw(cfg.data)

    rows: list[dict[str, Any]] = []
    quarantined: list[dict[str, Any]] = []
    by_id: dict[str, dict[str, Any]] = {}
    read = merged = 0
    for record in tqdm(records, desc="prepare", unit=" rows", leave=False, disable=None):
        read += 1
        where = {"origin": record.origin, "line": record.line, "source_split": record.source_split}
        if record.row is None:
            quarantined.append({**where, "reasons": [{"field": "<line>", "reason": record.error}], "raw": record.text})
            continue
        parsed = parse(source, record.row, keep_divergent)
        if parsed.problems:
            quarantined.append({**where, "reasons": [p.as_dict() for p in parsed.problems], "raw": record.row})
            continue
        pair_id = row_id(source, parsed.prompt, parsed.chosen, parsed.rejected)
        if pair_id in by_id:
            by_id[pair_id].setdefault("merged", []).append({**where, "original": record.row})
            merged += 1
            continue
        by_id[pair_id] = {
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
        rows.append(by_id[pair_id])

    splits = assign_splits([r["group"] for r in rows], [r["source_split"] for r in rows], cfg.prepare.split)
    out_dir = Path(cfg.prepare.out_dir)
    counts = Counter(splits)
    for split in SPLITS:
        write_jsonl(out_dir / f"{split}.jsonl", ({**row, "split": s} for row, s in zip(rows, splits) if s == split))
    write_jsonl(cfg.prepare.quarantine_file, quarantined)
    summary = {
        "rows_read": read,
        "rows_prepared": len(rows),
        "rows_merged": merged,
        "rows_quarantined": len(quarantined),
        "splits": {s: counts.get(s, 0) for s in SPLITS},
        "quarantined_by_field": dict(Counter(r["field"] for q in quarantined for r in q["reasons"])),
        "source": description,
    }
    write_json(out_dir / "summary.json", summary)
    write_provenance(out_dir, stage="prepare", config_hash=cfg.section_hash("data", "prepare"), inputs=description)
    seconds = time.perf_counter() - started
    log.info(
        "prepare: read %d %s rows from %s, wrote %s to %s, merged %d repeated pairs, quarantined %d to %s (%.1f s)",
        read, source, cfg.data.resolved_local_dir() or description.get("path"),
        " / ".join(f"{counts.get(s, 0)} {s}" for s in SPLITS), out_dir, merged, len(quarantined),
        cfg.prepare.quarantine_file, seconds,
    )
    return {**summary, "seconds": round(seconds, 3)}
