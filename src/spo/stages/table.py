"""The pipeline's shape, written once: each stage, what it reads, what it writes and where.

Both orchestrators are derived from this table. ``dvc.yaml`` is checked against it
(tests/test_stage_table.py: every stage's params, data deps, outs, metrics and plots); the Kubeflow
side reads it at compile and run time: the KFP step names (:data:`STEP_NAMES`), the params text
each step gets (:func:`sections`), the wiring of the DAG (:attr:`Stage.inputs`), the config
paths a component's artifacts stand for (``spo.pipelines.runtime.run_step``) and the checkout
path of every artifact ``publish`` records (:func:`checkout_path`).

A path in the checkout is not written here: it is the default of the config key that holds it
(``params.yaml`` / :class:`~spo.config.SpoConfig`), which ``dvc repro`` uses as is. Adding a stage
means a row here, its module in ``spo.stages`` and its component (docs/architecture.md).

The table is plain data, importable without torch, kfp or DVC.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Out:
    """One thing a stage writes.

    ``key`` is the config key holding its path. The KFP artifact is that path itself, except:
    ``file`` (the key names one file, kept inside the artifact's folder under this name),
    ``inside`` (the key names a folder; the artifact is this one file of it) and ``beside`` (the
    artifact is this file, written beside the one the key names).
    """

    name: str  # the component's output parameter
    kind: str  # its KFP artifact type: Dataset, Model, Metrics, Artifact, HTML, Markdown
    key: str
    dvc: str = "outs"  # where dvc.yaml lists it: outs, metrics or plots
    cache: bool = True  # dvc.yaml's `cache:`; false: small files kept beside the code, not in DVC's cache
    persist: bool = False  # dvc.yaml's `persist:`: kept across reruns (checkpoints, paid judgments)
    file: str = ""
    inside: str = ""
    beside: str = ""
    per_cell: str = ""  # a per-cell stage's checkout path, with {cell}


@dataclass(frozen=True)
class In:
    """One thing a stage reads that another stage wrote: ``source`` is ``<stage>.<output>``.

    ``gather``: the key names a folder holding several such inputs, each under the last part of
    its checkout path (the report's metrics folder, the policies' folder); from a per-cell stage
    the input is the list of every cell's artifact. ``file``: the key names this file inside the
    input's folder.
    """

    name: str  # the component's input parameter
    source: str
    key: str
    gather: bool = False
    file: str = ""


@dataclass(frozen=True)
class Stage:
    """One stage: ``spo.stages.<name>.run`` under ``dvc repro``, one component under KFP.

    ``params`` are dvc.yaml's (what invalidates the stage); ``reads`` adds the config sections
    the stage reads without depending on them (the report shows every stage's settings).
    ``per_cell``: the stage runs once per cell of the grid (variant x seed): a DVC matrix, a KFP
    loop whose outputs the stages after it collect as lists.
    """

    name: str
    params: tuple[str, ...]
    inputs: tuple[In, ...] = ()
    outputs: tuple[Out, ...] = ()
    reads: tuple[str, ...] = ()
    per_cell: bool = False

    def output(self, name: str) -> Out:
        """The output called ``name``."""
        for out in self.outputs:
            if out.name == name:
                return out
        raise KeyError(f"stage {self.name} has no output {name!r}; it has {[o.name for o in self.outputs]}")


def _metrics(stage: str) -> Out:
    return Out("metrics", "Metrics", f"{stage}.metrics_file", dvc="metrics", cache=False)


_ROWS = "validate.validated"
_ALL_SECTIONS = ("seed", "data", "prepare", "validate", "keywords", "degrees", "model", "base_model", "sft", "train",
                 "variants", "grid", "generate", "reward_model", "judge", "report")
# a cell's outputs in a checkout: the config's spo.config.CELL_POLICY and CELL_METRICS, which `spo train
# --variant --seed` writes to (tests/test_stage_table.py checks that they are the same)
CELL_POLICY = "models/policy/{cell}"
CELL_METRICS = "metrics/train_{cell}.json"

TABLE: tuple[Stage, ...] = (
    Stage("prepare", ("seed", "data", "prepare"), outputs=(
        Out("prepared", "Dataset", "prepare.out_dir"),
        Out("quarantine", "Dataset", "prepare.quarantine_file", file="prepare.jsonl"))),
    Stage("validate", ("validate", "prepare.quarantine_file"), inputs=(
        In("prepared", "prepare.prepared", "validate.in_dir"),
        In("prepare_quarantine", "prepare.quarantine", "prepare.quarantine_file")), outputs=(
        Out("validated", "Dataset", "validate.out_dir"),
        Out("quarantine", "Dataset", "validate.quarantine_file", file="validate.jsonl"),
        Out("validation", "Artifact", "validate.report_dir", cache=False),
        _metrics("validate"))),
    Stage("keywords", ("seed", "keywords"), inputs=(In("validated", _ROWS, "keywords.in_dir"),), outputs=(
        Out("keywords", "Dataset", "keywords.out_dir"), _metrics("keywords"))),
    Stage("degrees", ("degrees",), inputs=(
        In("validated", _ROWS, "degrees.in_dir"),
        In("keywords", "keywords.keywords", "degrees.keywords_dir")), outputs=(
        Out("degrees", "Dataset", "degrees.out_dir"), _metrics("degrees"),
        Out("plot", "Artifact", "degrees.metrics_file", dvc="plots", cache=False,
            beside="degrees_removed_fraction.png"),
        Out("audit_plot", "Artifact", "degrees.metrics_file", dvc="plots", cache=False,
            beside="degrees_shortcut_audit.png"))),
    Stage("base_model", ("seed", "model", "base_model"), inputs=(In("validated", _ROWS, "base_model.text_dir"),),
          outputs=(Out("base", "Model", "base_model.out_dir"),)),
    Stage("sft", ("seed", "model", "sft"), inputs=(
        In("validated", _ROWS, "sft.rows_dir"), In("base", "base_model.base", "sft.base_dir")), outputs=(
        Out("sft", "Model", "sft.out_dir"), _metrics("sft"))),
    Stage("reference", ("model", "train.max_length", "train.max_prompt_length", "train.eval_rows", "train.lora",
                        "train.mixed_precision", "train.optim.micro_batch_size"), inputs=(
        In("validated", _ROWS, "train.rows_dir"), In("sft", "sft.sft", "train.sft_dir")), outputs=(
        Out("reference", "Dataset", "train.reference_dir"),)),
    Stage("train", ("seed", "model", "train", "variants.${item.variant}"), per_cell=True, inputs=(
        In("validated", _ROWS, "train.rows_dir"), In("degrees", "degrees.degrees", "train.degrees_dir"),
        In("sft", "sft.sft", "train.sft_dir"), In("reference", "reference.reference", "train.reference_dir")),
        outputs=(
        Out("policy", "Model", "train.out_dir", persist=True, per_cell=CELL_POLICY),
        Out("metrics", "Metrics", "train.metrics_file", dvc="metrics", cache=False, per_cell=CELL_METRICS))),
    Stage("generate", ("seed", "model", "generate", "variants", "grid.seeds"), inputs=(
        In("validated", _ROWS, "generate.rows_dir"), In("sft", "sft.sft", "generate.models.sft"),
        In("policies", "train.policy", "generate.policy_dir", gather=True)), outputs=(
        Out("generations", "Dataset", "generate.out_dir"), _metrics("generate"))),
    Stage("reward_model", ("seed", "model", "reward_model"), inputs=(
        In("validated", _ROWS, "reward_model.rows_dir"), In("sft", "sft.sft", "reward_model.sft_dir")), outputs=(
        Out("reward", "Model", "reward_model.out_dir"), _metrics("reward_model"))),
    Stage("judge", ("seed", "data.dataset", "model", "judge", "variants", "grid.seeds", "generate.models",
                    "generate.policies"),
          inputs=(
        In("validated", _ROWS, "judge.rows_dir"), In("generations", "generate.generations", "judge.generations_dir"),
        In("reward", "reward_model.reward", "judge.reward_model_dir")), outputs=(
        Out("judgments", "Dataset", "judge.out_dir"),
        Out("judge_cache", "Artifact", "judge.cache_file", cache=False, persist=True, file="judge_cache.sqlite"),
        _metrics("judge"))),
    Stage("report", ("report", "data.dataset", "model.name_or_path"), reads=_ALL_SECTIONS, inputs=(
        In("validation", "validate.validation", "report.validation_report", file="validation.json"),
        In("degrees", "degrees.degrees", "report.degrees_dir"),
        In("judgments", "judge.judgments", "report.judgments_dir"),
        In("policies", "train.policy", "report.policy_dir", gather=True),
        *(In(f"{stage}_metrics", f"{stage}.metrics", "report.metrics_dir", gather=True)
          for stage in ("validate", "keywords", "degrees", "sft", "train", "generate", "reward_model", "judge"))),
        outputs=(
        Out("report_md", "Markdown", "report.out_dir", cache=False, inside="report.md"),
        Out("report_html", "HTML", "report.out_dir", cache=False, inside="report.html"),
        Out("plots", "Artifact", "report.plots_dir", cache=False))),
)

STAGES: tuple[str, ...] = tuple(stage.name for stage in TABLE)
# the KFP steps: the stages, after ``configure`` (one params text per stage) and ``data_version``
# (the data files' content, for prepare's cache key), then ``publish`` (dvc.lock and the DVC remote)
STEP_NAMES: tuple[str, ...] = ("configure", "data_version", *STAGES, "publish")


def stage(name: str) -> Stage:
    """The row of stage ``name``."""
    for row in TABLE:
        if row.name == name:
            return row
    raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(STAGES)}")


def producer(source: str) -> tuple[Stage, Out]:
    """``<stage>.<output>`` -> the stage and the output it names."""
    name, _, output = source.partition(".")
    return stage(name), stage(name).output(output)


def sections(row: Stage) -> tuple[str, ...]:
    """The config sections a KFP step's params text holds: those of its params, and what it reads.

    KFP keys its cache on that text, so a step reruns when exactly these change, as DVC's stage
    does on its params.
    """
    # a templated entry (train's ``variants.${item.variant}``) is DVC's: a KFP train task gets its cell's
    # settings as a parameter (spo.config.SpoConfig.cell_settings), so its cache key holds its own variant only
    wanted = {entry.split(".", 1)[0] for entry in row.params if "${" not in entry} | set(row.reads)
    return tuple(section for section in _ALL_SECTIONS if section in wanted)


def checkout_path(source: str, defaults: dict[str, str], cell: str = "") -> str:
    """Where ``<stage>.<output>`` lies in a checkout, as ``dvc repro`` writes it (a per-cell
    stage's output: that of ``cell``).

    ``defaults`` maps config keys to their default values (:func:`spo.config.path_defaults`).
    """
    row, out = producer(source)
    if out.per_cell:
        if not cell:
            raise ValueError(f"{source} is written once per cell: name the cell")
        return out.per_cell.format(cell=cell)
    path = defaults[out.key]
    if out.inside:
        return f"{path.rstrip('/')}/{out.inside}"
    if out.beside:
        return f"{path.rsplit('/', 1)[0]}/{out.beside}"
    return path


def published() -> tuple[tuple[str, str], ...]:
    """Every output of a run as ``(publish's input parameter, <stage>.<output>)``: the parameter is
    ``<stage>_<output>`` (a list of every cell's, for a per-cell stage), so the ``publish``
    component's signature follows from the table."""
    return tuple((f"{row.name}_{out.name}", f"{row.name}.{out.name}") for row in TABLE for out in row.outputs)
