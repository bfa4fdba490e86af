"""The grid's size and cost, known from the params alone, shown (and checked) before it is spent.

A grid is every variant trained once per seed (:meth:`spo.config.SpoConfig.cells`). What it
costs follows from the params: training steps per cell, sampled responses per generated model,
and judge calls (each item judged in both orders). ``spo grid`` prints it, ``spo pipeline
compile`` and ``submit`` print it and refuse a grid over ``grid``'s limits, and so does every
``spo train --variant --seed`` cell under ``dvc repro`` before it trains.

Counts the params cannot know (all prompts of a split, all epochs of an unknown number of pairs)
are ``None`` and printed as such, never guessed. The OpenAI cost is an upper bound: every call
with its longest prompt (``generate.max_prompt_length`` prompt tokens plus two responses of
``sampling.max_new_tokens``, plus the judge template) and ``judge.openai.max_tokens`` of answer;
judgments already in the cache are not paid again, so a rerun costs less.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from spo.config import SpoConfig
from spo.errors import GridTooLarge

TEMPLATE_TOKENS = 300  # the judge prompt around the dialogue and the two responses (spo/judging/prompts), rounded up


@dataclass(frozen=True)
class GridSize:
    variants: int
    seeds: int
    cells: int
    steps_per_cell: int | None  # train.optim.max_steps, with each variant's own `set`; None: all epochs (unknown)
    train_steps: int | None
    generated_models: int
    generations: int | None  # sampled responses: prompts x samples x models
    comparisons: int
    judge_calls: int | None  # two per item (both orders)
    judge: str
    cost_usd_at_most: float | None  # OpenAI judge only

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def grid_size(cfg: SpoConfig) -> GridSize:
    """The grid's size from the params (see the module docstring for what is an upper bound)."""
    cells = cfg.cells()
    steps = [cfg.cell(c.variant, c.seed).train.optim.max_steps for c in cells]
    known_steps = None if any(s is None for s in steps) else [int(s) for s in steps if s is not None]
    models = cfg.generation_models()
    prompts = cfg.generate.max_prompts
    samples = cfg.generate.sampling.num_samples
    comparisons = cfg.judge_comparisons()
    calls = None if prompts is None else 2 * prompts * len(comparisons)
    cost = None
    if cfg.judge.backend == "openai" and calls is not None:
        oa = cfg.judge.openai
        prompt_tokens = TEMPLATE_TOKENS + cfg.generate.max_prompt_length + 2 * cfg.generate.sampling.max_new_tokens
        cost = calls * (prompt_tokens * oa.budget.usd_per_1k_prompt_tokens
                        + oa.max_tokens * oa.budget.usd_per_1k_completion_tokens) / 1000
    judge = f"openai:{cfg.judge.openai.model}" if cfg.judge.backend == "openai" else "reward (local)"
    return GridSize(variants=len(cfg.variants), seeds=len(cfg.grid.seeds), cells=len(cells),
                    steps_per_cell=known_steps[0] if known_steps and len(set(known_steps)) == 1 else None,
                    train_steps=sum(known_steps) if known_steps is not None else None,
                    generated_models=len(models),
                    generations=None if prompts is None else prompts * samples * len(models),
                    comparisons=len(comparisons), judge_calls=calls, judge=judge, cost_usd_at_most=cost)


def over_limits(cfg: SpoConfig, size: GridSize) -> list[str]:
    """Each of ``grid``'s limits the grid is over, in words (empty: within them all)."""
    limits = cfg.grid
    found = []
    if size.cells > limits.max_cells:
        found.append(f"{size.cells} cells ({size.variants} variants x {size.seeds} seeds) > grid.max_cells "
                     f"{limits.max_cells}")
    if limits.max_judge_calls is not None:
        if size.judge_calls is None:
            found.append(f"the judge calls are unknown (generate.max_prompts null: every test prompt), so "
                         f"grid.max_judge_calls {limits.max_judge_calls} cannot be checked")
        elif size.judge_calls > limits.max_judge_calls:
            found.append(f"{size.judge_calls} judge calls > grid.max_judge_calls {limits.max_judge_calls}")
    if limits.max_cost_usd is not None and cfg.judge.backend == "openai":
        if size.cost_usd_at_most is None:
            found.append(f"the judge's cost is unknown (generate.max_prompts null), so grid.max_cost_usd "
                         f"{limits.max_cost_usd} cannot be checked")
        elif size.cost_usd_at_most > limits.max_cost_usd:
            found.append(f"the judge may cost up to ${size.cost_usd_at_most:.2f} > grid.max_cost_usd "
                         f"${limits.max_cost_usd:.2f}")
    return found


def check_grid(cfg: SpoConfig, *, allow_over: bool = False) -> GridSize:
    """The grid's size; :class:`GridTooLarge` when it is over a limit and ``allow_over`` is false."""
    size = grid_size(cfg)
    found = over_limits(cfg, size)
    if found and not allow_over:
        raise GridTooLarge("the grid is over its limits: " + "; ".join(found) + ". Shrink variants or grid.seeds, "
                           "raise the limit in params.yaml (grid.*), or pass --allow-large-grid (spo pipeline) / "
                           "-S grid.max_cells=... (dvc repro)")
    return size


def format_grid(size: GridSize) -> str:
    """The grid in two lines, as ``spo grid`` and the pipeline commands print it."""
    def known(value: int | None, unit: str) -> str:
        return f"{value} {unit}" if value is not None else f"all {unit} (unknown before the data is read)"

    steps = (f"{size.steps_per_cell} steps each, {size.train_steps} in all" if size.steps_per_cell is not None
             else known(size.train_steps, "training steps"))
    cost = f", at most ${size.cost_usd_at_most:.2f}" if size.cost_usd_at_most is not None else ""
    return (f"grid: {size.variants} variants x {size.seeds} seeds = {size.cells} training cells ({steps}); "
            f"{known(size.generations, 'generations')} from {size.generated_models} models; "
            f"{size.comparisons} comparisons, {known(size.judge_calls, 'judge calls')} with {size.judge}{cost}")
