"""The picture of the pipeline graph, drawn from a compiled pipeline (never by hand).

Tasks and their dependencies are read off the compiled spec (``root.dag.tasks[*].dependentTasks``);
the picture keeps the transitive reduction (an edge implied by a longer path is left out: every
task reads ``configure``'s params, only the first shows it) and lays tasks out in layers (one
below the deepest dependency). A task placed on an accelerator by the platform file is drawn in
the accelerator's colour, so the picture also shows where the GPUs go. The grid's loop is drawn
as its train task, labelled with the number of cells it runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def tasks(pipeline_yaml: str | Path) -> dict[str, dict[str, Any]]:
    """task -> {"label", "after" (its dependencies), "accelerator" (type or None)} of a compiled pipeline."""
    docs = [d for d in yaml.safe_load_all(Path(pipeline_yaml).read_text(encoding="utf-8")) if d]
    spec = next(d for d in docs if "root" in d)
    executors = spec["deploymentSpec"]["executors"]
    components = spec["components"]
    out = {}
    for name, task in spec["root"]["dag"]["tasks"].items():
        label, inner = task["taskInfo"]["name"], task
        if "parameterIterator" in task:  # the grid's loop: drawn as its task, once per cell
            (inner,) = components[task["componentRef"]["name"]]["dag"]["tasks"].values()
            items = task["parameterIterator"]["items"].get("raw")
            label = f"{inner['taskInfo']['name']} x {len(json.loads(items)) if items else 'n'} cells"
        executor = components[inner["componentRef"]["name"]]["executorLabel"]
        accelerator = executors[executor]["container"].get("resources", {}).get("accelerator", {}).get("resourceType")
        out[name] = {"label": label, "after": list(task.get("dependentTasks", [])), "accelerator": accelerator}
    return out


def layers(graph: dict[str, dict[str, Any]]) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(name: str) -> int:
        if name not in depth:
            depth[name] = 1 + max((visit(d) for d in graph[name]["after"]), default=-1)
        return depth[name]

    for name in graph:
        visit(name)
    return depth


def draw(pipeline_yaml: str | Path, out_png: str | Path) -> Path:
    """Draw the compiled pipeline's graph to ``out_png`` (top to bottom, GPU tasks highlighted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    graph = tasks(pipeline_yaml)
    dag = nx.DiGraph([(dep, name) for name, info in graph.items() for dep in info["after"]])
    dag.add_nodes_from(graph)
    reduced = nx.transitive_reduction(dag)
    for name in graph:
        graph[name]["after"] = sorted(reduced.predecessors(name))
    depth = layers(graph)
    rows: dict[int, list[str]] = {}
    for name in sorted(graph, key=lambda n: (depth[n], n)):
        rows.setdefault(depth[name], []).append(name)
    pos: dict[str, tuple[float, float]] = {}
    for level in sorted(rows):  # each layer ordered by its parents' mean x (fewer crossing edges)
        row = sorted(rows[level],
                     key=lambda n: sum(pos[p][0] for p in graph[n]["after"]) / max(len(graph[n]["after"]), 1))
        pos.update({name: (i - (len(row) - 1) / 2, -level) for i, name in enumerate(row)})
    fig, ax = plt.subplots(figsize=(9, 1.1 * len(rows) + 1))
    for name, info in graph.items():
        for dep in info["after"]:
            (x0, y0), (x1, y1) = pos[dep], pos[name]
            ax.annotate("", xy=(x1, y1 + 0.18), xytext=(x0, y0 - 0.18),
                        arrowprops={"arrowstyle": "->", "color": "#777777", "lw": 0.8})
    for name, (x, y) in pos.items():
        gpu = graph[name]["accelerator"]
        ax.text(x, y, graph[name]["label"] + (f"\n[{gpu}]" if gpu else ""), ha="center", va="center", fontsize=9,
                bbox={"boxstyle": "round,pad=0.4", "fc": "#f6c26b" if gpu else "#dbe8f5", "ec": "#444444"})
    ax.set_xlim(min(x for x, _ in pos.values()) - 1, max(x for x, _ in pos.values()) + 1)
    ax.set_ylim(-max(rows) - 0.7, 0.7)
    ax.axis("off")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
