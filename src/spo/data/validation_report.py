"""A self-contained HTML page for the validation report (no external CSS or JS).

The input is the JSON report the ``validate`` stage writes (``validation.json``), so the two
never disagree: totals at the top, then one table row per expectation with its column, its
verdict, how many rows GX flagged, how many were quarantined and a few examples with reasons.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from spo.io import atomic_open

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222}
h1{font-size:1.5em;margin-bottom:.2em}
.verdict{display:inline-block;padding:.2em .6em;border-radius:4px;font-weight:600;color:#fff}
.ok{background:#2e7d32}.bad{background:#c62828}.skip{background:#757575}
table{border-collapse:collapse;margin-top:1em;width:100%}
th,td{border:1px solid #ccc;padding:.35em .6em;text-align:left;vertical-align:top;font-size:.92em}
th{background:#f2f2f2}
tr.failed td{background:#fff4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.95em}
ul{margin:0;padding-left:1.1em}
.totals td:first-child{font-weight:600}
"""


def _status(item: dict[str, Any]) -> tuple[str, str]:
    if not item["evaluated"]:
        return "skip", "not evaluated"
    return ("ok", "passed") if item["success"] else ("bad", "failed")


def render_html(report: dict[str, Any]) -> str:
    totals = report["totals"]
    failed = totals["failed"]
    verdict = (
        f'<span class="verdict bad">FAILED: bad fraction {totals["bad_fraction"]:.4f} '
        f'&gt; max {totals["max_bad_fraction"]}</span>'
        if failed
        else f'<span class="verdict ok">PASSED: bad fraction {totals["bad_fraction"]:.4f} '
        f'&le; max {totals["max_bad_fraction"]}</span>'
    )
    total_rows = [
        ("rows read by prepare", totals["rows_read_prepare"]),
        ("rows quarantined by prepare", totals["rows_quarantined_prepare"]),
        ("rows validated (input)", totals["rows_in"]),
        ("rows valid", totals["rows_valid"]),
        ("rows quarantined by validate", totals["rows_quarantined_validate"]),
        ("valid per split", ", ".join(f"{k}: {v}" for k, v in totals["valid_per_split"].items())),
        ("expectations failed", f'{report["expectations_failed"]} of {len(report["expectations"])}'),
        ("quarantine file", report["quarantine_file"]),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>SPO data validation report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Data validation report</h1>",
        f"<p>{verdict}</p>",
        f'<p>Great Expectations {escape(report["great_expectations_version"])}, suite '
        f'<code>{escape(report["suite"])}</code>, one run over all splits.</p>',
        '<table class="totals"><tbody>',
        *(f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in total_rows),
        "</tbody></table>",
        "<h2>Expectations</h2>",
        "<table><thead><tr><th>check</th><th>expectation</th><th>column</th><th>rows</th>"
        "<th>result</th><th>unexpected</th><th>quarantined</th><th>examples (id: reason)</th></tr></thead><tbody>",
    ]
    for item in report["expectations"]:
        css, label = _status(item)
        examples = "".join(
            f"<li><code>{escape(str(ex['id']))}</code> ({escape(str(ex['split']))}): {escape(ex['reason'])}</li>"
            for ex in item["examples"]
        )
        if item.get("note"):
            examples = f"<li>{escape(item['note'])}</li>" + examples
        parts.append(
            f'<tr class="{"failed" if css == "bad" else ""}">'
            f"<td>{escape(item['title'])}</td>"
            f"<td><code>{escape(item['type'])}</code></td>"
            f"<td><code>{escape(item['column'])}</code></td>"
            f"<td>{escape(item['condition'] or 'all')}</td>"
            f'<td><span class="verdict {css}">{label}</span></td>'
            f'<td class="num">{item["unexpected_count"]}</td>'
            f'<td class="num">{item["rows_quarantined"]}</td>'
            f"<td>{'<ul>' + examples + '</ul>' if examples else ''}</td></tr>"
        )
    parts += ["</tbody></table>", "</body></html>", ""]
    return "\n".join(parts)


def write_html_report(path: str | Path, report: dict[str, Any]) -> None:
    html = render_html(report)
    with atomic_open(path) as handle:
        # Reasons are built ASCII-safe; backslashreplace guards against any stray surrogate.
        handle.write(html.encode("utf-8", "backslashreplace").decode("utf-8"))
