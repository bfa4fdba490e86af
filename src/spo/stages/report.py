"""Stage ``report``: the run summarised for humans in ``report.out_dir``.

Reads the stages' metrics files, the validation report, each policy's training logs, the judge's
win rates and the provenance records; every input is optional (a missing one reads "not run").
Writes ``report.md`` (PNG curves beside it, linked), ``report.html`` (self-contained: inline CSS,
images as data URIs) and the curve PNGs.  See docs/report.md.
"""

from __future__ import annotations

import logging
from typing import Any

from spo.config import SpoConfig
from spo.report import build_report

log = logging.getLogger("spo.report")


def run(cfg: SpoConfig) -> dict[str, Any]:
    """Build the report (the work is :mod:`spo.report`'s; the stage only reads the config) and say
    where it went and which sections had nothing to show."""
    summary = build_report(cfg)
    log.info("report written to %s and %s", summary["report"], summary["html"])
    if summary["not_run"]:
        log.info("sections not run: %s", ", ".join(summary["not_run"]))
    return summary
