"""The final report: one Markdown file and one self-contained HTML file from a finished run.

The report is built as a small list of blocks (:class:`Doc`) that render both to Markdown
and to HTML, so the two always hold the same content and no Markdown library is needed.
Every input is optional: a missing or unreadable file gives a "not run" line, never an error.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spo.config import SpoConfig
from spo.degree_audit import FORMATTING_PROBES
from spo.errors import InputError
from spo.plots import degree_levels, grid_plot, policy_plots, win_rate_plot
from spo.results import (
    DIFFERENCE_HEADER,
    GRID_HEADER,
    VARIANT_DEGREE_HEADER,
    audit_line,
    degree_accuracy,
    degree_by_variant,
    grid_difference_table,
    grid_rows,
    grid_table,
    judge_line,
    judge_quality,
    variant_degree_table,
)

log = logging.getLogger("spo.report")

NOT_RUN = "not run"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
TEXT_CHARS = 300
PROVENANCE_FILE = "provenance.json"
GRID_PNG = "grid.png"


# --------------------------------------------------------------------------- document model
@dataclass
class Doc:
    """Blocks: ("h", level, text), ("p", text), ("table", headers, rows), ("img", alt, file),
    ("list", items), ("details", summary, lang, text)."""

    blocks: list[tuple[Any, ...]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def not_run(self, what: str) -> None:
        self.p(f"_{what}: {NOT_RUN}._")

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", headers, [[str(c) for c in row] for row in rows]))

    def img(self, alt: str, file: str) -> None:
        self.blocks.append(("img", alt, file))

    def items(self, items: list[str]) -> None:
        self.blocks.append(("list", items))

    def details(self, summary: str, lang: str, text: str) -> None:
        self.blocks.append(("details", summary, lang, text))


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", " ↵ ")


def to_markdown(doc: Doc) -> str:
    out: list[str] = []
    for block in doc.blocks:
        kind = block[0]
        if kind == "h":
            out.append(f"{'#' * block[1]} {block[2]}")
        elif kind == "p":
            out.append(block[1])
        elif kind == "table":
            headers, rows = block[1], block[2]
            out.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
            out.append("|" + "|".join("---" for _ in headers) + "|")
            out.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows)
        elif kind == "img":
            out.append(f"![{block[1]}]({block[2]})")
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in block[1]))
        elif kind == "details":
            out.append(f"<details><summary>{block[1]}</summary>\n\n```{block[2]}\n{block[3].rstrip()}\n```\n\n</details>")
        out.append("")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1,h2,h3{border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3} tr:nth-child(even) td{background:#fafafa}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:.85em}
em{color:#777}
"""


def _inline_html(text: str) -> str:
    """Plain text, escaped; a whole ``_..._`` paragraph becomes italics (the "not run" lines)."""
    if len(text) > 2 and text.startswith("_") and text.endswith("_"):
        return f"<em>{html.escape(text[1:-1])}</em>"
    return html.escape(text)


def to_html(doc: Doc, image_dir: Path, title: str = "SPO report") -> str:
    """Self-contained HTML: inline CSS, every image embedded as a base64 data URI."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
    ]
    for block in doc.blocks:
        kind = block[0]
        if kind == "h":
            out.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
        elif kind == "p":
            out.append(f"<p>{_inline_html(block[1])}</p>")
        elif kind == "table":
            out.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
                       + "</tr></thead><tbody>")
            out.extend("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block[2])
            out.append("</tbody></table>")
        elif kind == "img":
            path = image_dir / block[2]
            if path.is_file():
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                out.append(f'<img alt="{html.escape(block[1])}" src="data:image/png;base64,{data}">')
            else:
                out.append(f"<p><em>{html.escape(block[1])}: image missing</em></p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "details":
            out.append(f"<details><summary>{html.escape(block[1])}</summary><pre>{html.escape(block[3])}</pre></details>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- reading inputs
def _load_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("cannot read %s (%s): treated as not run", path, err)
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    try:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                line = line.strip()
                if line:
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(row, dict):
                        rows.append(row)
    except OSError:
        return []
    return rows


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def fmt(value: Any, digits: int = 3) -> str:
    number = _num(value)
    if number is None:
        return "–" if value is None else str(value)
    if number == int(number) and abs(number) < 1e12 and isinstance(value, int):
        return str(int(number))
    return f"{number:.{digits}f}"


def pct(value: Any) -> str:
    number = _num(value)
    return "–" if number is None else f"{100 * number:.1f}%"


def winrate_cell(record: dict[str, Any]) -> str:
    """'51.0% [41.0, 61.0] (n=100)' — the paper's cell: win rate, 95% interval, items."""
    wr, lo, hi = (_num(record.get(k)) for k in ("win_rate", "ci_low", "ci_high"))
    if wr is None:
        return "–"
    interval = f" [{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None and hi is not None else ""
    return f"{100 * wr:.1f}%{interval} (n={record.get('n', '?')})"


def _truncate(text: str, limit: int = TEXT_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _policies(policy_dir: Path) -> list[Path]:
    if not policy_dir.is_dir():
        return []
    return sorted(p for p in policy_dir.iterdir() if p.is_dir() and any(
        (p / f).is_file() for f in ("metrics.jsonl", "train_summary.json", "degree_confusion.png")))


# --------------------------------------------------------------------------- plots
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(name: str, lines: list[dict[str, Any]], out_dir: Path) -> list[str]:
    """Loss parts + reward accuracy over steps, and degree accuracy per level; returns file names."""
    from spo.io import save_figure

    plt = _plt()
    train = [r for r in lines if r.get("split") == "train" and _num(r.get("step")) is not None]
    evals = [r for r in lines if r.get("split") == "eval" and _num(r.get("step")) is not None]
    if not train and not evals:
        return []
    files = []
    loss_keys = sorted({k for r in train + evals for k in r if k.startswith("loss") and _num(r[k]) is not None})
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, key in enumerate(loss_keys):
        color = colors[i % len(colors)]
        for rows, style, split in ((train, "-", "train"), (evals, "--o", "eval")):
            pts = [(r["step"], r[key]) for r in rows if _num(r.get(key)) is not None]
            if pts:
                ax_loss.plot(*zip(*pts), style, color=color, label=f"{key} ({split})", markersize=4)
    ax_loss.set(title=f"{name}: loss parts", xlabel="step", ylabel="loss")
    ax_loss.legend(fontsize=7)
    for rows, style, split in ((train, "-", "train"), (evals, "--o", "eval")):
        pts = [(r["step"], r["rewards/accuracies"]) for r in rows if _num(r.get("rewards/accuracies")) is not None]
        if pts:
            ax_acc.plot(*zip(*pts), style, label=split, markersize=4)
    ax_acc.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax_acc.set(title=f"{name}: reward accuracy", xlabel="step", ylabel="accuracy", ylim=(0, 1))
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    files.append(f"curves_{name}.png")
    save_figure(fig, out_dir / files[-1])
    plt.close(fig)

    levels = sorted({lvl for r in train + evals for s in ("w", "l") for lvl in degree_levels(r, s)})
    if levels:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
        for ax, side, label in ((axes[0], "w", "chosen (w)"), (axes[1], "l", "rejected (l)")):
            for i, lvl in enumerate(levels):
                key = f"degree/accuracy_{side}/level_{lvl}"
                color = colors[i % len(colors)]
                for rows, style, split in ((train, "-", "train"), (evals, "--o", "eval")):
                    pts = [(r["step"], r[key]) for r in rows if _num(r.get(key)) is not None]
                    if pts:
                        ax.plot(*zip(*pts), style, color=color, label=f"level {lvl} ({split})", markersize=4)
            ax.axhline(1 / len(levels), color="grey", lw=0.8, ls=":")
            ax.set(title=f"{name}: degree accuracy, {label}", xlabel="step", ylim=(0, 1.02))
            ax.legend(fontsize=7)
        axes[0].set_ylabel("accuracy")
        fig.tight_layout()
        files.append(f"degree_accuracy_{name}.png")
        save_figure(fig, out_dir / files[-1])
        plt.close(fig)
    return files


def plot_grid(rows: list[tuple[str, dict[str, Any]]], path: Path) -> bool:
    """grid.png: per family (a variant against chosen, SFT or its twin) the win rate pooled over seeds
    as a bar with its 95% interval, each seed's own win rate as a dot (how much the seed moves it),
    and the 50% line; False when no family has a win rate."""
    from spo.io import save_figure

    rows = [(name, f) for name, f in rows if _num(f.get("win_rate")) is not None]
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(rows)))
    ys = list(range(len(rows)))[::-1]  # the table's first row on top
    for y, (_, f) in zip(ys, rows):
        low, high = _num(f.get("ci_low")), _num(f.get("ci_high"))
        ax.barh(y, f["win_rate"], color="#8fb3d9", height=0.6)
        if low is not None and high is not None:
            ax.errorbar(f["win_rate"], y, xerr=[[f["win_rate"] - low], [high - f["win_rate"]]], fmt="none",
                        ecolor="#222", capsize=4)
        seeds = [v for v in (f.get("per_seed") or {}).values() if _num(v) is not None]
        ax.scatter(seeds, [y] * len(seeds), color="#c0392b", s=18, zorder=3,
                   label="one seed" if y == ys[0] else None)
    ax.axvline(0.5, color="grey", lw=0.8, ls=":", label="50%")
    ax.set_yticks(ys, [f"{f.get('a', '?')} vs {f.get('b', '?')}" for _, f in rows])
    ax.set(xlim=(0, 1), xlabel="win rate (ties count half), 95% paired bootstrap interval",
           title="The grid: win rate pooled over seeds")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


def _title(header: tuple[str, ...]) -> list[str]:
    """The terminal's column names as the report's table headers (first letter upper case)."""
    return [h[:1].upper() + h[1:] for h in header]


# --------------------------------------------------------------------------- sections
class Builder:
    def __init__(self, cfg: SpoConfig) -> None:
        self.cfg = cfg
        rc = cfg.report
        self.metrics_dir = Path(rc.metrics_dir)
        self.judgments_dir = Path(rc.judgments_dir)
        self.policy_dir = Path(rc.policy_dir)
        self.degrees_dir = Path(rc.degrees_dir)
        self.validation_report = Path(rc.validation_report)
        self.out_dir = Path(rc.out_dir)
        self.doc = Doc()
        self.sections: dict[str, str] = {}
        self.policy_lines: dict[str, list[dict[str, Any]]] = {}
        self.images: list[str] = []

    def metric(self, stage: str) -> dict[str, Any] | None:
        data = _load_json(self.metrics_dir / f"{stage}.json")
        return data if isinstance(data, dict) else None

    def _status(self, name: str, ran: bool) -> None:
        self.sections[name] = "ok" if ran else NOT_RUN

    def _copy_image(self, src: Path, name: str) -> str | None:
        if not src.is_file():
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if src.resolve() != (self.out_dir / name).resolve():
            shutil.copyfile(src, self.out_dir / name)
        self.images.append(name)
        return name

    def judged(self) -> dict[str, Any]:
        """The judge's results: metrics/judge.json, or the judgments folder's copy of it."""
        judge = self.metric("judge")
        if judge is None:
            judge = _load_json(self.judgments_dir / "winrates.json")
        return judge if isinstance(judge, dict) else {}

    # -- the grid
    def grid(self) -> None:
        """The results table of the grid (as ``spo results`` prints it): each family pooled over the
        seeds, SPO minus its twin, the judge's accuracy, and the degree heads per variant beside the
        shortcut audit they must beat."""
        d = self.doc
        d.h(2, "Grid")
        judged = self.judged()
        grid = judged.get("grid")
        grid = grid if isinstance(grid, dict) else {}
        rows = grid_table(grid)
        self._status("grid", bool(rows))
        if not rows:
            d.not_run("Grid (win rates pooled over seeds)")
            return
        d.p("Each variant (loss x SPO) is trained once per seed and judged on the same prompts by the same judge. "
            "Win rate pooled over the seeds: the mean over seeds and prompts (ties count half), its 95% paired "
            "bootstrap interval over prompts, the seed spread (the per-seed win rates' range and sd) and tie rate.")
        d.table(_title(GRID_HEADER), [list(row) for row in rows])
        if self._plot_grid(grid):
            self.images.append(GRID_PNG)
            d.img("the grid's win rates", GRID_PNG)
        differences = grid_difference_table({k: v for k, v in (judged.get("grid_differences") or {}).items()
                                             if isinstance(v, dict)})
        if differences:
            d.p("SPO minus its twin without SPO, pooled over seeds: points of win rate against the same opponent, "
                "95% paired bootstrap interval over prompts.")
            d.table(_title(DIFFERENCE_HEADER), [list(row) for row in differences])
        self.grid_judge_and_heads(judged)

    def _plot_grid(self, grid: dict[str, Any]) -> bool:
        try:
            return plot_grid(grid_rows(grid), self.out_dir / GRID_PNG)
        except Exception as err:  # a plotting problem must not lose the report
            log.warning("could not plot the grid: %s", err)
            return False

    def grid_judge_and_heads(self, judged: dict[str, Any]) -> None:
        """Under the grid, how far its numbers can be trusted: the judge's held-out accuracy, and the
        degree heads' accuracy per variant beside the length probes of the shortcut audit."""
        d = self.doc
        records = {k: v for k, v in judged.items() if isinstance(v, dict) and "win_rate" in v}
        try:
            judge = judge_quality(records, self.metrics_dir / "reward_model.json")
            heads = variant_degree_table(degree_by_variant(degree_accuracy(self.policy_dir)))
        except InputError as err:
            log.warning("grid: %s", err)
            return
        d.p(f"The {judge_line(judge)}.")
        if heads:
            d.p("Degree heads per variant: mean eval accuracy over its seeds, seed spread (range and sd), chance 1/N.")
            d.table(_title(VARIANT_DEGREE_HEADER), [list(row) for row in heads])
        audit = (self.metric("degrees") or {}).get("shortcut_audit")
        if isinstance(audit, dict) and isinstance(audit.get("probes"), dict):
            d.p(audit_line(audit) + ".")

    # -- win rates
    def winrates(self) -> None:
        d = self.doc
        d.h(2, "Win rates")
        judge = self.judged()
        records = {k: v for k, v in (judge or {}).items() if isinstance(v, dict) and "win_rate" in v}
        self._status("winrates", bool(records))
        if not records:
            d.not_run("Judge (win rates)")
            return
        dataset = self.cfg.data.dataset
        d.p(f"Win rate of a against b (ties count half), 95% bootstrap interval and judged items, on {dataset}.")
        rows = []
        for name, r in records.items():
            method = f"{r.get('a', '?')} vs {r.get('b', '?')}"
            rows.append([name, method, winrate_cell(r), pct(r.get("tie_rate")), pct(r.get("lc_win_rate")),
                         fmt(r.get("position_consistency"), 2), r.get("judge_id") or "–"])
        d.table(["Comparison", "Method", dataset, "Tie rate", "LC win rate", "Position consistency", "Judge"], rows)
        if self._copy_image(self.judgments_dir / "winrates.png", "winrates.png"):
            d.img("win rates", "winrates.png")
        paired = {k: v for k, v in ((judge or {}).get("paired_differences") or {}).items() if isinstance(v, dict)}
        if paired:
            d.p("Each SPO policy against its twin without SPO (trained on the same pairs in the same order), both "
                "judged against the same opponent on the same prompts: the difference of their win rates, with a "
                "95% paired bootstrap interval over the prompts judged for both.")
            d.table(["Difference", "Against", "Points", "95% interval", "Prompts"],
                    [[f"{r.get('a', '?')} − {r.get('twin', '?')}", r.get("b", "?"),
                      "–" if r.get("difference") is None else f"{100 * r['difference']:+.1f}",
                      "–" if r.get("ci_low") is None else f"[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]",
                      fmt(r.get("n"))] for r in paired.values()])
        rouge: dict[str, dict[str, Any]] = {}
        for r in records.values():  # summaries: each model's ROUGE against the reference summary
            for model, scores in (r.get("rouge") or {}).items():
                if isinstance(scores, dict):
                    rouge.setdefault(model, scores)
        if rouge:
            types = sorted({t for scores in rouge.values() for t in scores})
            d.p("ROUGE F-measure of each model's summaries against the data set's chosen summary:")
            d.table(["Model", *types],
                    [[model, *(fmt(scores.get(t)) for t in types)] for model, scores in rouge.items()])

    # -- validation
    def validation(self) -> None:
        d = self.doc
        d.h(2, "Data validation")
        metrics = self.metric("validate")
        report = _load_json(self.validation_report)
        report = report if isinstance(report, dict) else None
        totals = metrics or (report or {}).get("totals")
        self._status("validation", bool(totals or report))
        if not totals and not report:
            d.not_run("Validation")
            return
        if totals:
            quarantined = sum(int(totals.get(k) or 0)
                              for k in ("rows_quarantined_prepare", "rows_quarantined_validate"))
            d.table(["Rows read (prepare)", "Rows in (validate)", "Valid", "Quarantined", "Bad fraction", "Failed"], [[
                fmt(totals.get("rows_read_prepare")), fmt(totals.get("rows_in")), fmt(totals.get("rows_valid")),
                f"{quarantined} (prepare {fmt(totals.get('rows_quarantined_prepare'))}, "
                f"validate {fmt(totals.get('rows_quarantined_validate'))})",
                f"{fmt(totals.get('bad_fraction'), 4)} (max {fmt(totals.get('max_bad_fraction'), 3)})",
                str(totals.get("failed", "–")),
            ]])
        failing: list[list[Any]] = []
        if report:
            for e in report.get("expectations") or []:
                if isinstance(e, dict) and not e.get("success", True):
                    failing.append([e.get("check", "?"), e.get("title", ""), e.get("unexpected_count", 0),
                                    e.get("rows_quarantined", 0)])
        elif metrics and isinstance(metrics.get("check_failures"), dict):
            failing = [[k, "", v, "–"] for k, v in metrics["check_failures"].items() if v]
        failing.sort(key=lambda r: -(_num(r[2]) or 0))
        if failing:
            d.p("Top failing checks:")
            d.table(["Check", "Description", "Unexpected", "Rows quarantined"], failing[:5])
        else:
            d.p("No failing checks.")

    # -- keywords + degrees
    def keywords(self) -> None:
        d = self.doc
        d.h(2, "Keywords")
        kw = self.metric("keywords")
        self._status("keywords", kw is not None)
        if kw is None:
            d.not_run("Keyword extraction")
        else:
            d.table(["Method", "Responses", "Phrases per response (mean)", "Phrases per response (median)",
                     "Covered char fraction", "Responses without phrases", "Responses/s"], [[
                kw.get("method", "?"), fmt(kw.get("responses")), fmt(kw.get("phrases_per_response_mean"), 2),
                fmt(kw.get("phrases_per_response_median"), 1), fmt(kw.get("covered_char_fraction_mean"), 3),
                fmt(kw.get("responses_without_phrases")), fmt(kw.get("responses_per_second"), 0)]])
        d.h(2, "Degree levels")
        deg = self.metric("degrees")
        self._status("degrees", deg is not None)
        if deg is None:
            d.not_run("Degree construction")
        else:
            n_levels = int(deg.get("n_levels") or 0)
            rows = []
            for lvl in range(n_levels):
                r = deg.get(f"level_{lvl}") or {}
                rows.append([lvl, fmt(r.get("phrases_removed_mean"), 2), fmt(r.get("removed_fraction_mean"), 3),
                             fmt(r.get("removed_fraction_median"), 3)])
            d.table(["Level", "Phrases removed (mean)", "Removed fraction (mean)", "Removed fraction (median)"], rows)
            nd = (deg.get("responses_not_distinct") or {}).get("total") or {}
            if nd:
                d.p(f"Responses whose levels are not all distinct: {fmt(nd.get('count'))} "
                    f"({pct(nd.get('fraction'))}) of {fmt(deg.get('responses'))}.")
            self.shortcut_audit(deg.get("shortcut_audit"))
        self.degree_examples()

    def shortcut_audit(self, audit: Any) -> None:
        """The degrees stage's shortcut audit: what content-free probes make of the levels."""
        d = self.doc
        d.h(3, "Shortcut audit")
        if not isinstance(audit, dict) or not isinstance(audit.get("probes"), dict):
            d.not_run("Shortcut audit")
            return
        d.p(f"Held-out accuracy of classifiers that see no content, on {fmt(audit.get('test_responses'))} "
            f"{audit.get('split', '?')} responses (trained on {fmt(audit.get('train_responses'))}); chance "
            f"{pct(audit.get('chance'))}. Formatting probes must stay within "
            f"{pct(audit.get('max_above_chance'))} of chance; length probes are what removing content "
            "changes by design, the floor a degree head must clear (docs/degrees.md).")
        shortcuts = audit.get("shortcuts") or {}
        rows = []
        for name, probe in audit["probes"].items():
            if not isinstance(probe, dict):
                continue
            kind = "formatting" if name in FORMATTING_PROBES else "length"
            verdict = "SHORTCUT" if name in shortcuts else ("ok" if kind == "formatting" else "reported")
            interval = (f"[{pct(probe.get('ci_low'))}, {pct(probe.get('ci_high'))}]"
                        if probe.get("ci_low") is not None else "–")
            rows.append([name, kind, pct(probe.get("accuracy")), interval,
                         " ".join(fmt(v, 2) for v in probe.get("per_level") or []), verdict])
        d.table(["Probe", "Kind", "Accuracy", "95% interval", "Per level", ""], rows)
        if not audit.get("judged", True):
            d.p("Too few held-out responses to judge the formatting probes.")
        if self._copy_image(self.metrics_dir / "degrees_shortcut_audit.png", "degrees_shortcut_audit.png"):
            d.img("shortcut audit", "degrees_shortcut_audit.png")

    def degree_examples(self) -> None:
        d = self.doc
        n = self.cfg.report.examples
        if n <= 0:
            return
        path = self.degrees_dir / "train.jsonl"
        examples: list[dict[str, Any]] = []
        try:
            with path.open(encoding="utf-8") as handle:
                for line in handle:
                    try:
                        row = json.loads(line)
                        levels = row["chosen"]["levels"]
                    except (ValueError, KeyError, TypeError):
                        continue
                    if isinstance(levels, list) and len(levels) > 1 and len({str(x) for x in levels}) == len(levels):
                        examples.append(row)
                        if len(examples) >= n:
                            break
        except OSError:
            pass
        d.h(3, "Examples (chosen responses of the first train rows with distinct levels)")
        if not examples:
            d.not_run("Degree examples")
            return
        for row in examples:
            chosen = row["chosen"]
            fractions = chosen.get("removed_fraction") or []
            d.p(f"Row {row.get('id', '?')}:")
            d.table(["Level", "Removed fraction", "Text"], [
                [lvl, fmt(fractions[lvl], 2) if lvl < len(fractions) else "–", _truncate(str(text))]
                for lvl, text in enumerate(chosen["levels"])])

    # -- training
    def training(self) -> None:
        d = self.doc
        d.h(2, "Training")
        d.h(3, "SFT")
        sft = self.metric("sft")
        self._status("sft", sft is not None)
        if sft is None:
            d.not_run("SFT")
        else:
            d.table(["Eval loss before", "Eval loss after", "Train loss first", "Train loss last", "Steps",
                     "Tokens/s"], [[
                fmt(sft.get("eval_loss_before")), fmt(sft.get("eval_loss_after")), fmt(sft.get("train_loss_first")),
                fmt(sft.get("train_loss_last")), fmt(sft.get("steps")), fmt(sft.get("tokens_per_second"), 0)]])
        d.h(3, "Policies")
        policies = _policies(self.policy_dir)
        self._status("policies", bool(policies))
        if not policies:
            d.not_run(f"Policy training (nothing under {self.policy_dir})")
            return
        for pdir in policies:
            self.policy(pdir)

    def policy(self, pdir: Path) -> None:
        d = self.doc
        name = pdir.name
        d.h(4, f"Policy {name}")
        summary = _load_json(pdir / "train_summary.json")
        summary = summary if isinstance(summary, dict) else {}
        lines = _read_jsonl(pdir / "metrics.jsonl")
        self.policy_lines[name] = lines  # the dvc plots data comes from the same lines
        last = {}
        for split in ("train", "eval"):
            logged = [r for r in lines if r.get("split") == split]
            last[split] = logged[-1] if logged else {}
        if not last["eval"] and isinstance(summary.get("eval"), dict):
            last["eval"] = summary["eval"]
        if summary:
            d.p(f"Loss: {summary.get('loss', '?')}; "
                f"steps {fmt(summary.get('steps'))}/{fmt(summary.get('total_steps'))}; "
                f"skipped {fmt(summary.get('skipped_steps'))}; degree mode {summary.get('degree_mode', '–')}; "
                f"train seconds {fmt(summary.get('train_seconds'), 1)}.")
        if not last["train"] and not last["eval"]:
            d.not_run(f"Training metrics of {name}")
        else:
            keys = sorted({k for r in last.values() for k in r if k.startswith("loss") and _num(r[k]) is not None})
            keys += ["rewards/accuracies", "rewards/margins"]
            rows = []
            for split in ("train", "eval"):
                r = last[split]
                if r:
                    rows.append([split, fmt(r.get("step", summary.get("steps")))] + [fmt(r.get(k)) for k in keys])
            d.p("Final values (last logged train step, last evaluation):")
            d.table(["Split", "Step"] + keys, rows)
            levels = sorted({lvl for r in last.values() for s in ("w", "l") for lvl in degree_levels(r, s)})
            if levels:
                rows = []
                for split in ("train", "eval"):
                    r = last[split]
                    for side, label in (("w", "chosen"), ("l", "rejected")):
                        if r and f"degree/accuracy_{side}" in r:
                            rows.append([split, label, fmt(r.get(f"degree/accuracy_{side}"))]
                                        + [fmt(r.get(f"degree/accuracy_{side}/level_{lvl}")) for lvl in levels])
                d.p("Degree accuracy per level:")
                d.table(["Split", "Side", "All"] + [f"Level {lvl}" for lvl in levels], rows)
        try:
            files = plot_training(name, lines, self.out_dir)
        except Exception as err:  # a plotting problem must not lose the report
            log.warning("could not plot %s: %s", name, err)
            files = []
        self.images.extend(files)
        for file in files:
            d.img(file.removesuffix(".png").replace("_", " "), file)
        if self._copy_image(pdir / "degree_confusion.png", f"degree_confusion_{name}.png"):
            d.img(f"degree confusion {name}", f"degree_confusion_{name}.png")

    # -- reward judge + generation
    def judge_and_generation(self) -> None:
        d = self.doc
        d.h(2, "Reward judge")
        rm = self.metric("reward_model")
        self._status("reward_model", rm is not None)
        if rm is None:
            d.not_run("Reward model")
        else:
            d.table(["Held-out accuracy before", "Held-out accuracy after", "Held-out pairs", "Train pairs",
                     "Steps"], [[
                fmt(rm.get("held_out_accuracy_before")), fmt(rm.get("held_out_accuracy_after")),
                fmt(rm.get("held_out_pairs")), fmt(rm.get("train_pairs")), fmt(rm.get("steps"))]])
        d.h(2, "Generation")
        gen = self.metric("generate")
        gen = {k: v for k, v in (gen or {}).items() if isinstance(v, dict)}
        self._status("generate", bool(gen))
        if not gen:
            d.not_run("Generation")
        else:
            d.table(["Model", "Prompts", "Samples", "Generated tokens", "Mean response tokens", "Tokens/s", "Empty"], [
                [name, fmt(g.get("prompts")), fmt(g.get("samples")), fmt(g.get("generated_tokens")),
                 fmt(g.get("mean_response_tokens"), 1), fmt(g.get("tokens_per_second"), 1),
                 fmt(g.get("empty_responses"))]
                for name, g in gen.items()])

    # -- config + provenance
    def provenance_files(self) -> list[Path]:
        c = self.cfg
        dirs = [c.prepare.out_dir, c.validate_.out_dir, c.keywords.out_dir, c.degrees.out_dir, c.base_model.out_dir,
                c.sft.out_dir, c.reward_model.out_dir, c.generate.out_dir, c.judge.out_dir]
        dirs += [str(p) for p in _policies(self.policy_dir)]
        seen, files = set(), []
        for folder in dirs:
            path = Path(folder) / PROVENANCE_FILE
            if path.is_file() and path.resolve() not in seen:
                seen.add(path.resolve())
                files.append(path)
        return files

    def config_and_provenance(self) -> None:
        d = self.doc
        d.h(2, "Configuration")
        dumped = self.cfg.model_dump(mode="json", by_alias=True)
        d.details("params (resolved)", "yaml", yaml.safe_dump(dumped, sort_keys=False))
        d.h(2, "Provenance")
        rows: list[list[str]] = []
        packages: dict[str, set[str]] = {}
        for path in self.provenance_files():
            prov = _load_json(path)
            if not isinstance(prov, dict):
                continue
            for key, digest in _hashes(prov.get("inputs")):
                rows.append([prov.get("stage", "?"), str(path.parent), key, digest[:16]])
            for pkg, version in (prov.get("packages") or {}).items():
                packages.setdefault(pkg, set()).add(str(version))
        self._status("provenance", bool(rows or packages))
        if rows:
            d.p("Input hashes (sha256, first 16 hex digits):")
            d.table(["Stage", "Output", "Input", "sha256"], rows)
        else:
            d.not_run("Provenance records")
        try:
            from spo.io import package_versions

            for pkg, version in package_versions().items():
                packages.setdefault(pkg, set())
                current = packages[pkg]
                if version not in current:
                    current.add(f"{version} (report)" if current else version)
        except Exception as err:  # pragma: no cover - metadata lookups should not fail the report
            log.warning("package versions: %s", err)
        if packages:
            d.table(["Package", "Version"], [[k, ", ".join(sorted(v))] for k, v in sorted(packages.items())])

    def build(self) -> Doc:
        d = self.doc
        d.h(1, f"SPO report — {self.cfg.data.dataset}")
        d.p(f"Data set: {self.cfg.data.dataset}; base model: {self.cfg.model.name_or_path}; seed {self.cfg.seed}.")
        self.grid()
        self.winrates()
        self.validation()
        self.keywords()
        self.training()
        self.judge_and_generation()
        self.config_and_provenance()
        return d


def _hashes(tree: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(name, sha256) pairs from a provenance ``inputs`` tree of any nesting."""
    out: list[tuple[str, str]] = []
    if isinstance(tree, dict):
        if isinstance(tree.get("sha256"), str):
            return [(str(tree.get("path") or prefix.rstrip("/")), tree["sha256"])]
        for key, value in tree.items():
            out += _hashes(value, f"{prefix}{key}/")
    elif isinstance(tree, str) and len(tree) == 64 and all(c in "0123456789abcdef" for c in tree):
        out.append((prefix.rstrip("/"), tree))
    return out


def write_plot_data(cfg: SpoConfig, builder: Builder) -> list[Path]:
    """The CSV files `dvc plots` draws, from the same inputs the report read."""
    plots_dir = Path(cfg.report.plots_dir)
    written = []
    for name, lines in builder.policy_lines.items():
        written += policy_plots(name, lines, plots_dir)
    judged = builder.metric("judge") or {}
    grid = judged.get("grid")
    tables = [win_rate_plot(judged, plots_dir), grid_plot(grid_rows(grid if isinstance(grid, dict) else {}), plots_dir)]
    return written + [path for path in tables if path]


def build_report(cfg: SpoConfig) -> dict[str, Any]:
    builder = Builder(cfg)
    out_dir = builder.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = builder.build()
    md_path, html_path = out_dir / REPORT_MD, out_dir / REPORT_HTML
    tmp = md_path.with_name(f".{REPORT_MD}.tmp")
    tmp.write_text(to_markdown(doc), encoding="utf-8")
    tmp.replace(md_path)
    tmp = html_path.with_name(f".{REPORT_HTML}.tmp")
    tmp.write_text(to_html(doc, out_dir, title=f"SPO report — {cfg.data.dataset}"), encoding="utf-8")
    tmp.replace(html_path)
    plots = write_plot_data(cfg, builder)
    return {
        "plots": [str(p) for p in plots],
        "report": str(md_path),
        "html": str(html_path),
        "images": builder.images,
        "sections": builder.sections,
        "not_run": sorted(k for k, v in builder.sections.items() if v == NOT_RUN),
    }
