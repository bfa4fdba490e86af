"""Stage ``validate``: prepared rows -> validated rows + quarantine + JSON/HTML report + metrics.

The Great Expectations suite (``spo.data.expectations``) runs once over the rows of all splits.
Each row that fails any expectation goes to the quarantine file with *all* its reasons and the
full prepared row; every other row goes to ``{out_dir}/{split}.jsonl`` unchanged and in input
order, so every input row ends up in exactly one place.

The stage fails (``StageFailed``, after writing every output) only when the rows lost by
prepare and validate together exceed ``max_bad_fraction`` of the rows prepare read.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spo.config import SPLITS, SpoConfig, ValidateConfig
from spo.errors import InputError, StageFailed
from spo.io import read_jsonl, tree_sha256, write_json, write_jsonl, write_provenance

if TYPE_CHECKING:  # pandas and the suite load only when the stage runs
    from spo.data.expectations import Outcome

log = logging.getLogger("spo.validate")
EXAMPLES_PER_CHECK = 5


def _read_inputs(in_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    if not in_dir.is_dir():
        raise InputError(f"{in_dir}: input folder not found (run `spo prepare` first, or set validate.in_dir)")
    rows: list[dict[str, Any]] = []
    file_splits: list[str] = []
    for split in SPLITS:
        path = in_dir / f"{split}.jsonl"
        if not path.is_file():
            raise InputError(f"{path}: split file not found (prepare writes train, eval and test)")
        for line_no, row in enumerate(read_jsonl(path), start=1):
            if not isinstance(row, dict):
                raise InputError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            file_splits.append(split)
    return rows, file_splits


def _printable(value: Any) -> str | None:
    """An id for the reports, which are written as UTF-8: a lone surrogate cannot be."""
    if value is None:
        return None
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def _count_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def _prepare_counts(cfg: SpoConfig, in_dir: Path, rows_in: int) -> tuple[int, int]:
    """(rows read by prepare, rows prepare quarantined); checks prepare's summary adds up."""
    quarantined = _count_lines(Path(cfg.prepare.quarantine_file))
    merged = 0  # repeated pairs prepare folded into one row: used, not bad
    summary_path = in_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        try:
            read, prepared, dropped = summary["rows_read"], summary["rows_prepared"], summary["rows_quarantined"]
        except (KeyError, TypeError):
            raise InputError(f"{summary_path}: not a prepare summary "
                             "(needs rows_read, rows_prepared, rows_quarantined)") from None
        merged = summary.get("rows_merged", 0) + summary.get("rows_outvoted", 0)
        if read != prepared + merged + dropped:
            raise RuntimeError(
                f"{summary_path}: rows_read {read} != rows_prepared {prepared} + rows_merged and outvoted "
                f"{merged} + rows_quarantined {dropped}"
            )
        if prepared != rows_in or dropped != quarantined:
            log.warning(
                "%s says %d prepared / %d quarantined, but %s holds %d rows and %s %d: "
                "the prepared folder or quarantine changed after prepare ran; counting what is there",
                summary_path, prepared, dropped, in_dir, rows_in, cfg.prepare.quarantine_file, quarantined,
            )
    return rows_in + merged + quarantined, quarantined


def run(cfg: SpoConfig) -> dict[str, Any]:
    """Run the suite once over the rows of every split, send each row to its split or the quarantine,
    write every output, and only then fail when prepare and validate together lost too many rows:
    the report of a failed run is what tells the user what to fix."""
    started = time.perf_counter()
    params = cfg.validate_
    in_dir, out_dir = Path(params.in_dir), Path(params.out_dir)
    rows, file_splits = _read_inputs(in_dir)
    rows_read_prepare, rows_quarantined_prepare = _prepare_counts(cfg, in_dir, len(rows))
    gx_version = _import_great_expectations()
    imported = time.perf_counter()
    outcomes = _run_suite(params, rows)
    suite_done = time.perf_counter()
    valid, quarantine = _route_rows(rows, file_splits, outcomes)

    bad_fraction = _bad_fraction(rows_quarantined_prepare + len(quarantine), rows_read_prepare)
    check_failures = {o.check.name: len(o.failed) for o in outcomes}
    totals = {
        "rows_read_prepare": rows_read_prepare,
        "rows_quarantined_prepare": rows_quarantined_prepare,
        "rows_in": len(rows),
        "rows_valid": sum(len(v) for v in valid.values()),
        "rows_quarantined_validate": len(quarantine),
        "bad_fraction": round(bad_fraction, 6),
        "max_bad_fraction": params.max_bad_fraction,
        "failed": bad_fraction > params.max_bad_fraction,
        "valid_per_split": {split: len(valid[split]) for split in SPLITS},
    }
    report = _report(params, gx_version, totals, outcomes, rows, file_splits)
    _write_outputs(cfg, valid, quarantine, report, {**totals, "check_failures": check_failures})

    seconds = time.perf_counter() - started
    log.debug(
        "validate timings: read+import %.2f s, suite %.2f s, write %.2f s",
        imported - started, suite_done - imported, time.perf_counter() - suite_done,
    )
    log.info(
        "validate: read %d rows from %s, wrote %s valid to %s, quarantined %d to %s "
        "(+%d by prepare, bad fraction %.4f) (%.1f s)",
        len(rows), in_dir, " / ".join(f"{len(valid[s])} {s}" for s in SPLITS), out_dir,
        len(quarantine), params.quarantine_file, rows_quarantined_prepare, bad_fraction, seconds,
    )
    _check_enough_valid(cfg, totals, check_failures)
    return {**totals, "check_failures": check_failures, "seconds": round(seconds, 3)}


def _bad_fraction(bad: int, rows_read_prepare: int) -> float:
    """Bad rows (quarantined by prepare or validate) per row prepare read; 0 when it read none."""
    return bad / rows_read_prepare if rows_read_prepare else 0.0


def _import_great_expectations() -> str:
    """Import GX (~5 s; only this stage pays for it) with its loggers quietened; its version, for the report."""
    gx_log = logging.getLogger("great_expectations")
    gx_log.setLevel(logging.WARNING)  # GX logs hundreds of INFO lines on import; keep ours readable
    import great_expectations as gx

    # GX pins this one logger to INFO ("Created temporary directory ... for ephemeral docs site").
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    return str(gx.__version__)


def _run_suite(params: ValidateConfig, rows: list[dict[str, Any]]) -> list[Outcome]:
    """Every expectation's outcome over all rows at once; the data frame is dropped as soon as the
    suite is done, since the rows themselves are what gets written."""
    from spo.data.expectations import build_checks, build_frame, run_suite

    frame = build_frame(rows)
    checks = build_checks(params, frame, rows)
    return run_suite(frame, checks)


def _route_rows(rows: list[dict[str, Any]], file_splits: list[str], outcomes: list[Outcome],
                ) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """(valid rows per split, quarantine entries): a row any expectation failed is quarantined with
    *all* its reasons, every other row stays in its split in input order; no row is lost or doubled."""
    reasons: dict[int, list[dict[str, str]]] = {}
    for outcome in outcomes:
        check = outcome.check
        for pos in outcome.failed:
            reasons.setdefault(pos, []).append(
                {"check": check.type, "field": check.field, "reason": check.describe(rows[pos])}
            )

    valid: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    quarantine: list[dict[str, Any]] = []
    for pos, (row, split) in enumerate(zip(rows, file_splits)):
        if pos in reasons:
            quarantine.append(
                {"id": row.get("id"), "split": split, "origin": row.get("origin"), "line": row.get("line"),
                 "reasons": reasons[pos], "row": row}
            )
        else:
            valid[split].append(row)
    rows_valid = sum(len(v) for v in valid.values())
    if len(rows) != rows_valid + len(quarantine):
        raise RuntimeError(f"validate lost rows: {len(rows)} in != {rows_valid} valid + {len(quarantine)} quarantined")
    return valid, quarantine


def _report(params: ValidateConfig, gx_version: str, totals: dict[str, Any], outcomes: list[Outcome],
            rows: list[dict[str, Any]], file_splits: list[str]) -> dict[str, Any]:
    """The JSON report (and the HTML one's content): totals, then each expectation with its counts and
    the first few failing rows, so a reader sees what failed without opening the quarantine."""
    from spo.data.expectations import SUITE_NAME

    return {
        "suite": SUITE_NAME,
        "great_expectations_version": gx_version,
        "quarantine_file": params.quarantine_file,
        "totals": totals,
        "expectations_failed": sum(1 for o in outcomes if not o.success),
        "expectations": [
            {
                "check": o.check.name,
                "title": o.check.title,
                "type": o.check.type,
                "column": o.check.column,
                "field": o.check.field,
                "condition": o.check.condition,
                "success": o.success,
                "evaluated": o.evaluated,
                "note": o.note,
                "element_count": o.element_count,
                "unexpected_count": o.unexpected_count,
                "rows_quarantined": len(o.failed),
                "examples": [
                    {"id": _printable(rows[p].get("id")), "split": file_splits[p], "reason": o.check.describe(rows[p])}
                    for p in o.failed[:EXAMPLES_PER_CHECK]
                ],
            }
            for o in outcomes
        ],
    }


def _write_outputs(cfg: SpoConfig, valid: dict[str, list[dict[str, Any]]], quarantine: list[dict[str, Any]],
                   report: dict[str, Any], metrics: dict[str, Any]) -> None:
    """The valid rows per split with their provenance, the quarantine, both reports and the metrics."""
    from spo.data.validation_report import write_html_report

    params = cfg.validate_
    out_dir, report_dir = Path(params.out_dir), Path(params.report_dir)
    for split in SPLITS:
        write_jsonl(out_dir / f"{split}.jsonl", valid[split])
    write_jsonl(params.quarantine_file, quarantine)
    write_provenance(out_dir, stage="validate", config_hash=cfg.section_hash("validate"),
                     inputs=tree_sha256(Path(params.in_dir)))
    write_json(report_dir / "validation.json", report)
    write_html_report(report_dir / "validation.html", report)
    write_json(params.metrics_file, metrics)


def _check_enough_valid(cfg: SpoConfig, totals: dict[str, Any], check_failures: dict[str, int]) -> None:
    """StageFailed when too many rows are bad or no train row is left (saying where to look); a
    warning for any other empty split, whose later stages will have nothing to do."""
    params = cfg.validate_
    report_html = Path(params.report_dir) / "validation.html"
    by_prepare, by_validate = totals["rows_quarantined_prepare"], totals["rows_quarantined_validate"]
    read = totals["rows_read_prepare"]
    if totals["failed"]:
        bad = by_prepare + by_validate
        worst = Counter({k: v for k, v in check_failures.items() if v}).most_common(3)
        raise StageFailed(
            f"validate: {bad} of {read} rows are bad (bad fraction {_bad_fraction(bad, read):.4f} > "
            f"max_bad_fraction {params.max_bad_fraction}): {by_prepare} quarantined by prepare "
            f"({cfg.prepare.quarantine_file}) and {by_validate} by validate ({params.quarantine_file}). "
            f"Most failed checks: {', '.join(f'{name} ({n} rows)' for name, n in worst) or 'none'}. "
            f"See the report {report_html}; fix the data or raise validate.max_bad_fraction."
        )
    if not totals["valid_per_split"]["train"]:
        raise StageFailed(
            f"validate: no valid train row ({by_validate} quarantined by validate to {params.quarantine_file}, "
            f"{by_prepare} by prepare): nothing to train on. See the report {report_html}."
        )
    for split in SPLITS:
        if not totals["valid_per_split"][split]:
            log.warning("validate: the %s split has no valid row: the stages that read it (%s) will have nothing to do",
                        split, "the evaluations" if split == "eval" else "generation and judging")
