"""The method's experiments as ``dvc exp run`` commands (presets in experiments.yaml), and a
summary of ``dvc exp show`` across them.

DVC already records, compares and queues experiments; what it lacks is the list of *which*
runs make each experiment of the paper, and a view of their win rates with intervals side by
side.  A preset is a named set of runs, each a list of ``dvc exp run -S`` overrides; every
override is checked against :class:`~spo.config.SpoConfig` before DVC spends any time, so a
typo fails in a second instead of after the data stages.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spo.config import SpoConfig, load_config
from spo.errors import ConfigError, InputError

log = logging.getLogger("spo.exp")

PRESETS_FILE = "experiments.yaml"
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Preset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = Field(description="What the experiment asks.")
    common: list[str] = Field(default_factory=list, description="Overrides every run starts from, before its own "
                              "(e.g. the real-model settings, shared by YAML anchor across presets).")
    runs: dict[str, list[str]] = Field(description="Run name -> `dvc exp run -S` overrides.")
    targets: list[str] = Field(default_factory=list, description="Stages to reproduce (with what they depend on), "
                               "e.g. [train@dpo_spo-0] (dvc.yaml's matrix stage of the grid cell dpo_spo_s0) when a "
                               "question needs one policy's metrics only; empty: all.")

    def overrides(self, run: str) -> list[str]:
        """The run's overrides: the preset's common ones, then its own (which win)."""
        return [*self.common, *self.runs[run]]


class PresetFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    presets: dict[str, Preset]


def load_presets(path: str | Path = PRESETS_FILE) -> dict[str, Preset]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: presets file not found")
    try:
        presets = PresetFile.model_validate(yaml.safe_load(path.read_text(encoding="utf-8"))).presets
    except ValidationError as err:
        lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"{path}: invalid presets:\n  " + "\n  ".join(lines)) from None
    for name, preset in presets.items():
        for run in preset.runs:
            full = f"{name}-{run}"
            if not _RUN_NAME.match(full) or ".." in full or full.endswith(".lock"):
                raise ConfigError(f"{path}: presets.{name}.runs.{run}: {full!r} is not a valid experiment name")
    return presets


def spo_override(dvc_override: str) -> str:
    """A ``dvc exp run -S`` (Hydra) override as ``spo -S`` takes it: ``+key=``/``++key=`` add a key."""
    if dvc_override.startswith("~"):
        raise ConfigError(f"override {dvc_override!r}: deleting a param is not supported in presets")
    return dvc_override.lstrip("+")


_CELL = re.compile(r"^(?P<variant>.+)_s(?P<seed>-?\d+)$")


def check_run(params: str | Path, overrides: list[str], targets: list[str] | None = None) -> SpoConfig:
    """Fail now, not after the data stages, on an override the config rejects, or on a ``train@``
    target that is not a stage of the run's grid (dvc.yaml's matrix: ``train@<variant>-<seed>``
    for every variant and seed in ``grid.seeds``)."""
    cfg = load_config(params, [spo_override(o) for o in overrides])
    stages = {train_stage(cell.name) for cell in cfg.cells()}
    for target in targets or []:
        if target.startswith("train@") and target not in stages:
            raise ConfigError(f"target {target!r} is not a train stage of this run's grid; its stages are "
                              f"{', '.join(sorted(stages))} (train@<variant>-<seed>)")
    return cfg


def train_stage(cell: str) -> str:
    """dvc.yaml's train stage of a grid cell: ``dpo_spo_s0`` -> ``train@dpo_spo-0`` (the matrix
    names a stage by its items, the cell's folders by ``<variant>_s<seed>``). A name that is not a
    cell's (a run from before the grid) keeps the old ``train@<policy>``."""
    match = _CELL.match(cell)
    return f"train@{match['variant']}-{match['seed']}" if match else f"train@{cell}"


def _reseeded(target: str, seed: int) -> str:
    """A grid cell's train stage for another seed (``train@dpo_spo-0`` -> ``train@dpo_spo-<seed>``);
    any other target as it is."""
    match = re.fullmatch(r"train@(?P<variant>.+)-(?P<seed>-?\d+)", target)
    return f"train@{match['variant']}-{seed}" if match else target


def dvc_command(preset: str, run: str, overrides: list[str], *, queue: bool = False, force: bool = False,
                in_workspace: bool = False, targets: list[str] | None = None) -> list[str]:
    """`dvc exp run` in a temporary copy of the workspace (or queued): a series of runs never
    edits the user's params.yaml nor leaves one run's outputs behind for the next.
    ``in_workspace``: in the workspace itself, whose outputs are then that run's (a demo).
    ``targets``: only these stages and their dependencies."""
    cmd = ["dvc", "exp", "run", "-n", f"{preset}-{run}"]
    if queue or not in_workspace:
        cmd.append("--queue" if queue else "--temp")
    if force:
        cmd.append("--force")
    for override in overrides:
        cmd += ["-S", override]
    return cmd + list(targets or [])


def run_preset(
    name: str,
    presets: dict[str, Preset],
    *,
    params: str | Path = "params.yaml",
    only: list[str] | None = None,
    extra: list[str] | None = None,
    queue: bool = False,
    force: bool = False,
    dry_run: bool = False,
    in_workspace: bool = False,
    seeds: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Run (or queue) every run of a preset in turn, each from the committed pipeline plus the
    workspace's uncommitted changes, in a temporary directory; the workspace is left as it was.

    ``seeds``: every run once per seed, named ``<preset>-<run>-s<seed>``, its grid of that seed alone
    (``grid.seeds=[seed]``: the seed of every cell's training; a ``train@<variant>-<seed>`` target
    follows it): the data stages are shared (DVC takes them from its cache), the training is
    redrawn, and ``spo exp summary`` gives each run's mean and spread over its seeds. (One run with
    ``-S grid.seeds=[0,1,2]`` instead trains every seed in one grid, judged as a paired design.)"""
    if name not in presets:
        raise ConfigError(f"no preset {name!r}; presets: {', '.join(presets)}")
    runs = presets[name].runs
    if in_workspace and (queue or len([r for r in runs if not only or r in only]) * len(seeds or [0]) > 1):
        raise ConfigError("--in-workspace runs one run, not queued: the workspace holds one run's outputs")
    unknown = sorted(set(only or []) - set(runs))
    if unknown:
        raise ConfigError(f"preset {name!r} has no run {unknown}; runs: {', '.join(runs)}")
    selected = {run: [*presets[name].overrides(run), *(extra or [])] for run in runs if not only or run in only}
    targets = {run: list(presets[name].targets) for run in selected}
    if seeds:
        targets = {f"{run}-s{seed}": [_reseeded(t, seed) for t in targets[run]] for run in selected for seed in seeds}
        selected = {f"{run}-s{seed}": [*overrides, f"grid.seeds=[{seed}]"]
                    for run, overrides in selected.items() for seed in seeds}
    for run, overrides in selected.items():
        try:
            check_run(params, overrides, targets[run])
        except ConfigError as err:
            raise ConfigError(f"preset {name}, run {run}: {err}") from None

    env = dict(os.environ)
    if env.get("SPO_DATA_DIR"):  # the runs execute in .dvc/tmp/exps/<run>: a relative path would miss
        env["SPO_DATA_DIR"] = str(Path(env["SPO_DATA_DIR"]).resolve())
    results: list[dict[str, Any]] = []
    for run, overrides in selected.items():
        cmd = dvc_command(name, run, overrides, queue=queue, force=force, in_workspace=in_workspace,
                          targets=targets[run])
        log.info("%s", " ".join(cmd))
        if dry_run:
            results.append({"run": run, "command": cmd, "returncode": None, "seconds": 0.0})
            continue
        started = time.perf_counter()
        returncode = subprocess.run(cmd, env=env).returncode
        results.append({"run": run, "command": cmd, "returncode": returncode,
                        "seconds": round(time.perf_counter() - started, 1)})
    failed = [r["run"] for r in results if r["returncode"]]
    verb = "would run" if dry_run else ("queued" if queue else "ran")
    log.info("exp %s: %s %d run(s)%s", name, verb, len(results), f", failed: {', '.join(failed)}" if failed else "")
    return results


# --------------------------------------------------------------------------- summary
def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree and prefix != "variants.":
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if prefix == "variants.":  # one column: the grid's variants, e.g. "dpo, dpo_spo, ipo"
        return {"variants": ", ".join(tree) if isinstance(tree, dict) else str(tree)}
    return {prefix.rstrip("."): json.dumps(tree) if isinstance(tree, (list, dict)) else tree}


def _row(name: str, rev: str, data: dict[str, Any] | None) -> dict[str, Any] | None:
    if not data:
        return None
    params = (data.get("params") or {}).get("params.yaml", {}).get("data") or {}
    metrics = {path: entry.get("data") for path, entry in (data.get("metrics") or {}).items() if entry.get("data")}
    judge = metrics.get("metrics/judge.json") or {}
    win_rates = {k: v for k, v in judge.items() if isinstance(v, dict) and isinstance(v.get("win_rate"), (int, float))}
    grid = judge.get("grid")
    if not isinstance(grid, dict):
        grid = {}
    families = {k: v for k, v in grid.items() if isinstance(v, dict) and isinstance(v.get("win_rate"), (int, float))}
    training = {}
    for path, values in metrics.items():
        match = re.fullmatch(r"metrics/train_(.+)\.json", path)
        if match and isinstance(values.get("eval"), dict):
            training[match.group(1)] = values["eval"]
    audit = (metrics.get("metrics/degrees.json") or {}).get("shortcut_audit")
    return {"name": name, "rev": rev[:7], "params": _flatten(params), "win_rates": win_rates, "grid": families,
            "training": training,
            "audit": audit if isinstance(audit, dict) and isinstance(audit.get("probes"), dict) else None}


def parse_exp_show(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of ``dvc exp show --json``: each baseline commit (one of several commits with the same
    params and results) with its experiments oldest first, then the workspace if it differs from
    all of them; rows with neither judge nor training metrics are dropped (a ``targets: [train@...]``
    run has only the latter)."""
    rows: list[dict[str, Any]] = []
    baselines: set[str] = set()
    workspace = None
    for entry in entries:
        if entry.get("rev") == "workspace":
            workspace = _row("workspace", "workspace", entry.get("data"))
            continue
        baseline = _row(entry.get("name") or entry.get("rev", "")[:7], entry.get("rev", ""), entry.get("data"))
        if baseline is not None and not any(  # --all-commits: commits that changed no param or result
            r and r["rev"] in baselines and (r["params"], r["win_rates"]) == (baseline["params"], baseline["win_rates"])
            for r in rows
        ):
            rows.append(baseline)
            baselines.add(baseline["rev"])
        for exp in reversed(entry.get("experiments") or []):
            revs = exp.get("revs") or []
            if revs:
                name = exp.get("name") or revs[0].get("name") or revs[0]["rev"][:7]
                row = _row(name, revs[0]["rev"], revs[0].get("data"))
                if row is not None:  # an experiment without data (still queued, or failed)
                    rows.append(row)
    if workspace is not None and not any(
        r and (r["params"], r["win_rates"]) == (workspace["params"], workspace["win_rates"]) for r in rows
    ):
        rows.append(workspace)
    return [r for r in rows if r and (r["win_rates"] or r["training"])]


def varying_params(rows: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for r in rows for k in r["params"]})
    return [k for k in keys if len({json.dumps(r["params"].get(k), sort_keys=True) for r in rows}) > 1]


def _cell(record: dict[str, Any] | None) -> str:
    from spo.report import winrate_cell

    return winrate_cell(record) if record else "–"


def paper_table(rows: list[dict[str, Any]], prefix: str = "loss_x_spo-") -> tuple[list[str], list[list[str]]]:
    """The paper's layout: policy (method) x data set, each cell the policy's win rate against the
    data set's chosen response.  A method is a variant of the grid, its win rate pooled over the
    run's seeds (judge.json's ``grid`` family ``<variant>_vs_chosen``, not one seed's cell); a run
    from before the grid has per-policy comparisons only, and those are its methods.  Taken from
    the `loss_x_spo` runs when there are any, else from every row; a later experiment for the same
    method and data set replaces an earlier one."""
    chosen = [r for r in rows if r["name"].startswith(prefix)] or rows
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    datasets: list[str] = []
    for row in chosen:
        dataset = str(row["params"].get("data.dataset", "?"))
        datasets += [dataset] if dataset not in datasets else []
        for record in (row.get("grid") or row["win_rates"]).values():
            if record.get("b") == "chosen":
                cells.setdefault(str(record.get("a")), {})[dataset] = record
    return datasets, [[method, *(_cell(by_set.get(d)) for d in datasets)] for method, by_set in cells.items()]


def summary_doc(rows: list[dict[str, Any]]) -> Any:
    from spo.report import Doc, fmt

    doc = Doc()
    doc.h(1, "SPO experiments")
    doc.p("One row per DVC experiment (`dvc exp show`); the params that differ between rows, then each "
          "comparison's win rate of a against b with its 95% bootstrap interval and judged items.")
    if not rows:
        doc.p("No experiment with judge metrics yet: run `spo exp run <preset>` (see `spo exp list`).")
        return doc
    params = varying_params(rows)
    comparisons = list(dict.fromkeys(c for r in rows for c in r["win_rates"]))
    doc.h(2, "Win rates")
    doc.table(["Experiment", *params, *comparisons],
              [[r["name"], *(str(r["params"].get(k, "–")) for k in params),
                *(_cell(r["win_rates"].get(c)) for c in comparisons)]
               for r in rows])
    doc.img("win rates per experiment", "experiments.png")
    datasets, table = paper_table(rows)
    doc.h(2, "Method x data set")
    doc.p("Win rate against the data set's chosen response (as in the paper's tables), from the `loss_x_spo` "
          "experiments when they have been run, otherwise from every experiment (the latest one wins).")
    doc.table(["Method", *datasets], table)
    doc.h(2, "Policies at their last evaluation")
    keys = ["rewards/accuracies", "rewards/margins", "degree/accuracy_w", "degree/accuracy_l"]
    doc.table(["Experiment", "Policy", *keys],
              [[r["name"], policy, *(fmt(ev.get(k)) for k in keys)]
               for r in rows for policy, ev in r["training"].items()])
    series = degree_levels(rows)
    if series:
        doc.h(2, "Degree heads per level")
        doc.p("Eval accuracy of each degree head over all levels, with its 95% bootstrap interval over eval "
              "responses and n predictions, against chance 1/N, then per true level (each level is predicted "
              "once per eval pair).")
        doc.table(["Experiment", "Policy", "Head", "n", "Accuracy", "95% interval", "Chance", "Per level"],
                  [[s["experiment"], s["policy"], s["head"], str(s["n"]), fmt(s["accuracy"]),
                    f"[{fmt(s['ci_low'])}, {fmt(s['ci_high'])}]", fmt(s["chance"]),
                    " ".join(fmt(lv["accuracy"]) for lv in s["levels"])] for s in series])
        probed = list(dict.fromkeys((s["experiment"], json.dumps(s["probes"])) for s in series if s["probes"]))
        if probed:
            doc.p("What the heads must beat: the degrees stage's shortcut audit of the same degree data "
                  "(classifiers on content-free features, fitted on half the responses, scored on the other half; "
                  "docs/degrees.md). The best formatting probe must sit at chance; the length probes are what "
                  "removing content gives away by itself.")
            doc.table(["Experiment", "Formatting (best)", "Length", "Word length", "All length probes"],
                      [[name, *(fmt(p.get(k)) for k in ("formatting_max", "length", "word_length", "length_all"))]
                       for name, p in ((name, json.loads(text)) for name, text in probed)])
        doc.img("degree accuracy per level", "experiments_degrees.png")
    groups = seed_groups(rows)
    if groups:
        doc.h(2, "Over seeds")
        doc.p("Runs of `spo exp run --seeds` (named `<run>-s<seed>`, `grid.seeds` that seed, the same data): per "
              "metric the mean over the seeds, the sample standard deviation, and the range; the per-seed "
              "values are the rows above.")
        doc.table(["Run", "Seeds", "Metric", "Mean", "SD", "Min", "Max"],
                  [[g["run"], " ".join(map(str, g["seeds"])), metric, fmt(v["mean"]), fmt(v["sd"]), fmt(v["min"]),
                    fmt(v["max"])] for g in groups for metric, v in g["metrics"].items()])
    return doc


_SEEDED = re.compile(r"^(?P<run>.+)-s(?P<seed>\d+)$")


def seed_groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs of ``spo exp run --seeds`` (``<name>-s<seed>``) grouped by name: per comparison the mean
    win rate over the seeds, its sample standard deviation, min and max; per policy and head the
    same of the degree accuracy.  A name with one seed is a group of one (no spread)."""
    groups: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for row in rows:
        match = _SEEDED.match(row["name"])
        if match:
            groups.setdefault(match["run"], []).append((int(match["seed"]), row))

    def spread(values: list[float]) -> dict[str, Any]:
        mean = math.fsum(values) / len(values)
        sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
        return {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "seeds": len(values)}

    out = []
    for run, members in groups.items():
        members.sort(key=lambda m: m[0])
        metrics: dict[str, dict[str, Any]] = {}
        names = dict.fromkeys(c for _, r in members for c in r["win_rates"])
        for comparison in names:
            values = [r["win_rates"][comparison]["win_rate"] for _, r in members if comparison in r["win_rates"]]
            metrics[f"win rate {comparison}"] = spread(values)
        for policy in dict.fromkeys(p for _, r in members for p in r["training"]):
            for side, head in (("w", "chosen"), ("l", "rejected")):
                values = [r["training"][policy][f"degree/accuracy_{side}"] for _, r in members
                          if isinstance(r["training"].get(policy, {}).get(f"degree/accuracy_{side}"), (int, float))]
                if values:
                    metrics[f"degree accuracy {policy} {head}"] = spread(values)
        out.append({"run": run, "seeds": [seed for seed, _ in members], "metrics": metrics})
    return out


def _run_name(name: str) -> str:
    """A preset's run name, without the ``-s<seed>`` of ``spo exp run --seeds``."""
    match = _SEEDED.match(name)
    return match.group("run") if match else name


def only_what_ran(rows: list[dict[str, Any]], presets: dict[str, Preset]) -> list[dict[str, Any]]:
    """Drop the metrics an experiment did not produce. A preset with ``targets`` reproduces those
    stages and what they depend on, so its metrics files for other stages are the baseline's
    (e.g. the committed demo's judge.json) and would be shown as that run's. Win rates are the
    run's own only if ``judge`` or ``report`` was a target; a policy's eval (``metrics/train_<cell>.json``)
    only if its train stage ran (``train@<variant>-<seed>``, ``train``, or a stage downstream of every
    policy)."""
    out = []
    for row in rows:
        targets = next((p.targets for name, p in presets.items() if p.targets and row["name"].startswith(f"{name}-")
                        and _run_name(row["name"][len(name) + 1:]) in p.runs), None)
        if targets:
            downstream = {"generate", "judge", "report"} & set(targets)
            judged = bool({"judge", "report"} & set(targets))
            row = {**row,
                   "win_rates": row["win_rates"] if judged else {},
                   **({"grid": row["grid"] if judged else {}} if "grid" in row else {}),
                   "training": {k: v for k, v in row["training"].items()
                                if downstream or "train" in targets or train_stage(k) in targets}}
        out.append(row)
    return out


def degree_levels(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per experiment, policy and head: the eval accuracy per true level with its 95% Wilson
    interval, and chance 1/N. Each level is predicted once per eval pair whose levels are distinct
    (``pairs`` − ``excluded_<side>``), so that is every level's n: within a level the responses
    are independent trials.  Over all levels they are not (the N levels of a response are
    correlated), so the overall interval is the trainer's bootstrap over responses
    (``degree/accuracy_<side>/ci_low``, ``ci_high``), none where an older run did not log it."""
    from spo.judging.statistics import wilson_interval

    out = []
    for r in rows:
        for policy, ev in r["training"].items():
            for side, head in (("w", "chosen"), ("l", "rejected")):
                levels = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in ev.items()
                                if k.startswith(f"degree/accuracy_{side}/level_") and isinstance(v, (int, float)))
                if not levels or not isinstance(ev.get("pairs"), (int, float)):
                    continue
                n = int(ev["pairs"] - (ev.get(f"excluded_{side}") or 0))
                per_level = [{"level": k, "accuracy": v, "n": n,
                              **dict(zip(("ci_low", "ci_high"), wilson_interval(round(v * n), n)))} for k, v in levels]
                overall = ev.get(f"degree/accuracy_{side}")
                low, high = ev.get(f"degree/accuracy_{side}/ci_low"), ev.get(f"degree/accuracy_{side}/ci_high")
                out.append({"experiment": r["name"], "policy": policy, "head": head, "n": n * len(levels),
                            "accuracy": overall, "ci_low": low, "ci_high": high, "chance": 1 / len(levels),
                            "levels": per_level, "probes": _probes(r.get("audit"))})
    return out


def _probes(audit: dict[str, Any] | None) -> dict[str, float | None]:
    """What a head must beat, from the degrees stage's shortcut audit of the same data (spo.degree_audit):
    the best formatting probe (which must sit at chance) and the length probes (which removal cannot
    avoid). Empty for a run from before the audit."""
    if not audit:
        return {}
    probes = audit["probes"]
    return {"formatting_max": audit.get("formatting_max"),
            **{name: (probes.get(name) or {}).get("accuracy") for name in ("length", "word_length", "length_all")}}


def plot_degrees(series: list[dict[str, Any]], path: Path) -> bool:
    """Degree accuracy per true level, one line per experiment (95% Wilson intervals), chance dashed."""
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spo.io import save_figure

    heads = list(dict.fromkeys(s["head"] for s in series))
    fig, axes = plt.subplots(1, len(heads), figsize=(5.2 * len(heads), 3.8), squeeze=False)
    for ax, head in zip(axes[0], heads):
        mine = [s for s in series if s["head"] == head]
        for j, s in enumerate(mine):
            x = [lv["level"] + 0.06 * (j - (len(mine) - 1) / 2) for lv in s["levels"]]
            y = [lv["accuracy"] for lv in s["levels"]]
            err = [[v - (lv["ci_low"] or v) for v, lv in zip(y, s["levels"])],
                   [(lv["ci_high"] or v) - v for v, lv in zip(y, s["levels"])]]
            ax.errorbar(x, y, yerr=err, fmt="o-", capsize=2, lw=1, ms=3, label=f"{s['experiment']} ({s['policy']})")
            ax.hlines(s["chance"], -0.2, len(s["levels"]) - 0.8, colors="grey", linestyles=":", lw=0.8)
        ax.set(title=f"degree head, {head} responses", xlabel="true level", ylabel="eval accuracy", ylim=(0, 1.02),
               xticks=range(max(len(s["levels"]) for s in mine)))
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


def plot_summary(rows: list[dict[str, Any]], path: Path) -> bool:
    """One panel per comparison: each experiment's win rate with its interval, 50% marked."""
    comparisons = list(dict.fromkeys(c for r in rows for c in r["win_rates"]))
    if not comparisons:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spo.io import save_figure

    cols = min(len(comparisons), 3)
    nrows = math.ceil(len(comparisons) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 0.45 * len(rows) * nrows + 1.6), squeeze=False)
    for ax, comp in zip(axes.flat, comparisons):
        pts = [(i, r["win_rates"][comp]) for i, r in enumerate(rows) if comp in r["win_rates"]]
        for i, rec in pts:
            lo, hi = rec.get("ci_low", rec["win_rate"]), rec.get("ci_high", rec["win_rate"])
            ax.errorbar(rec["win_rate"], i, xerr=[[rec["win_rate"] - lo], [hi - rec["win_rate"]]], fmt="o", capsize=3)
        ax.axvline(0.5, color="grey", lw=0.8, ls=":")
        ax.set(title=comp, xlim=(0, 1), yticks=range(len(rows)), xlabel="win rate")
        ax.set_yticklabels([r["name"] for r in rows], fontsize=8)
        ax.invert_yaxis()
    for ax in list(axes.flat)[len(comparisons):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


def exp_show(all_commits: bool = False) -> list[dict[str, Any]]:
    cmd = ["dvc", "exp", "show", "--json", *(["--all-commits"] if all_commits else [])]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise InputError(f"{' '.join(cmd)} failed:\n{result.stderr.strip()}")
    return json.loads(result.stdout)


def write_summary(rows: list[dict[str, Any]], out_dir: str | Path = "reports") -> dict[str, str]:
    """reports/experiments.{json,md,html,png}: the experiments side by side."""
    from spo.io import atomic_open, write_json
    from spo.report import to_html, to_markdown

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_summary(rows, out_dir / "experiments.png")
    plot_degrees(degree_levels(rows), out_dir / "experiments_degrees.png")
    doc = summary_doc(rows)
    write_json(out_dir / "experiments.json", rows)
    for name, text in (("experiments.md", to_markdown(doc)),
                       ("experiments.html", to_html(doc, out_dir, title="SPO experiments"))):
        with atomic_open(out_dir / name) as handle:
            handle.write(text)
    log.info("exp summary: %d experiments -> %s", len(rows), out_dir / "experiments.md")
    return {k: str(out_dir / f"experiments.{k}") for k in ("json", "md", "html", "png")}
