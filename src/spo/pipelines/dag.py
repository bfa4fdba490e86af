"""The pipeline graph, wired from the stage table (spo.stages.table), against which dvc.yaml is
checked too: data checks to the judged report, every cell of the grid side by side.

``configure`` → prepare → validate → keywords → degrees; validate → base_model → sft; then the
grid: one ``train`` task per cell (variant x seed, from the params file's ``variants`` and
``grid.seeds``), in a ``dsl.ParallelFor`` over the cells, all reading the one SFT model; generate
samples from sft and every cell's policy (collected with ``dsl.Collected``); reward_model trains
the local judge beside them; judge compares every cell with the data's chosen responses, each SPO
cell with its twin of the same seed and with SFT, and pools the seeds; report gathers it all;
``publish`` records every output in a dvc.lock and pushes them to the platform's DVC remote
(spo.lineage). Each task gets its stage's params text from ``configure`` and its placement from
the platform file (:func:`spo.pipelines.placement.place`). A train pool with more than one node or
process makes the train task a ``train_job`` launcher (spo.cluster), given the platform and the
run id to build its TrainJob from.

The grid is fixed at compile time, as DVC's matrix is when dvc.yaml is read: the loop's items are
the cells, each with its name and its own train settings (spo.config.SpoConfig.cell_settings), so
each cell's KFP cache key holds its own variant only (a changed variant reruns its cells, no
other), and the UI shows one loop whose iterations are the cells. (A loop over a run-time
parameter would have to carry every variant's settings in one string, putting them all in every
cell's cache key.) ``configure`` refuses a run whose params make another grid.

:func:`build_pipeline` returns the ``@dsl.pipeline`` function for a params file and a platform;
its parameters are the run's knobs, with the params file's values as defaults; the params file
itself is compiled in (``params``, when given at run time, replaces it, and ``overrides`` adds
``section.key=value`` settings), and so are dvc.yaml and .dvcignore, which ``publish`` records
the run against (:func:`dvc_files`). (No ``from
__future__ import annotations`` here: KFP reads the pipeline parameters' types from the
annotations.)
"""

import json
from pathlib import Path
from typing import Any

from spo.config import SpoConfig, load_config
from spo.kube.platform import Platform
from spo.pipelines.placement import place
from spo.pipelines.runtime import grid_of
from spo.stages.table import TABLE, published

PIPELINE_NAME = "spo-pipeline"


def knob_defaults(cfg: SpoConfig) -> dict[str, Any]:
    """The knobs' defaults, read off the params file (what the KFP UI shows before a run)."""
    return {
        "data_dir": cfg.data.local_dir or "", "dataset": cfg.data.dataset, "model": cfg.model.name_or_path,
        "n_levels": cfg.degrees.n_levels,
        "spo_lambda": cfg.train.spo.lambda_w, "train_steps": cfg.train.optim.max_steps or 0,
        "judge_backend": cfg.judge.backend, "judge_model": cfg.judge.openai.model,
    }


def dvc_files(params_path: "str | Path") -> "tuple[str, str]":
    """dvc.yaml's and .dvcignore's text: beside the params file, else in the current folder, else
    in the source checkout this package runs from; ``("", "")`` when there is none (``publish``
    then records no dvc.lock)."""
    import spo

    for folder in (Path(params_path).resolve().parent, Path.cwd(), Path(spo.__file__).resolve().parents[2]):
        if (folder / "dvc.yaml").is_file():
            ignore = folder / ".dvcignore"
            return ((folder / "dvc.yaml").read_text(encoding="utf-8"),
                    ignore.read_text(encoding="utf-8") if ignore.is_file() else "")
    return "", ""


def build_pipeline(params_path: "str | Path", platform: Platform) -> Any:
    """The pipeline function for ``params_path`` (its text is the ``params`` parameter's default)."""
    from kfp import dsl

    from spo.pipelines.components import make_components

    params_text = Path(params_path).read_text(encoding="utf-8")
    dvc_yaml, dvcignore = dvc_files(params_path)
    remote = platform.dvc_remote.model_dump_json(include={"url", "name", "endpoint_url", "region"}) \
        if platform.dvc_remote else ""
    cfg = load_config(params_path)
    d = knob_defaults(cfg)
    c = make_components(platform.image)
    # the run's own volume, a PVC KFP creates per run: only a TrainJob with no checkpoint volume needs
    # one, to hand its pods their inputs (every other step passes artifacts, spo.pipelines.runtime)
    uses_workspace = platform.train_job and platform.checkpoints is None
    workspace = dsl.WorkspaceConfig(
        size=platform.workspace.size,
        kubernetes=dsl.KubernetesWorkspaceConfig(pvcSpecPatch=_pvc_patch(platform)),
    ) if uses_workspace else None
    key_env = cfg.judge.openai.api_key_env

    def task(step: str, display: "str | None" = None, component: "str | None" = None, **kwargs: Any) -> Any:
        t = c[component or step](**kwargs).set_display_name(display or step.replace("_", " "))
        place(t, step, platform, key_env)
        return t

    cells = [{"cell": name, "settings": json.dumps(settings, sort_keys=True)}  # the loop's items: the grid's cells
             for name, settings in grid_of(cfg).items()]

    @dsl.pipeline(name=PIPELINE_NAME, description="SPO: DPO/IPO/KTO with and without the preference-degree loss, "
                  "a grid of variants x seeds from data checks to the judged report",
                  pipeline_config=dsl.PipelineConfig(workspace=workspace))
    def spo_pipeline(params: str = "", overrides: list = [], data_dir: str = d["data_dir"],  # noqa: B006
                     dataset: str = d["dataset"], model: str = d["model"], n_levels: int = d["n_levels"],
                     spo_lambda: float = d["spo_lambda"], train_steps: int = d["train_steps"],
                     judge_backend: str = d["judge_backend"], judge_model: str = d["judge_model"]) -> None:
        conf = task("configure", params=params, compiled_params=params_text, overrides=overrides, data_dir=data_dir,
                    dataset=dataset, model=model, n_levels=n_levels, spo_lambda=spo_lambda,
                    train_steps=train_steps, judge_backend=judge_backend, judge_model=judge_model)
        p = conf.outputs
        # on a data volume, the content of its files goes into prepare's cache key (runtime.data_version)
        version = task("data_version", "data version", params=p["prepare"]).output if platform.data_volume else ""
        # no run id among train's inputs: it would make every run's cache key new; nor the run's
        # workspace (its PVC name, new in every run, is in the cache key: see
        # spo.kube.platform.CheckpointVolume): the checkpoint volume, if any, has a fixed name
        volume = platform.checkpoints.mount_path if platform.checkpoints else ""
        where = ({"component": "train_job", "platform": platform.model_dump_json(),
                  "workspace": volume or dsl.WORKSPACE_PATH_PLACEHOLDER}
                 if platform.train_job else {"checkpoints": volume})
        tasks: dict[str, Any] = {}  # every stage's task, wired as the stage table says
        collected: dict[str, Any] = {}  # a per-cell stage's outputs, collected as lists by the stages after it
        for row in TABLE:
            kwargs = {"params": p[row.name], **({"data_version": version} if row.name == "prepare" else {}),
                      **{item.name: _output(tasks, collected, item.source) for item in row.inputs}}
            if not row.per_cell:
                tasks[row.name] = task(row.name, **kwargs)
                continue
            with dsl.ParallelFor(cells, name="grid") as cell:  # one task per cell of variants x seeds
                tasks[row.name] = task(row.name, **kwargs, cell=cell.cell, settings=cell.settings, **where)
            collected.update({f"{row.name}.{out.name}": tasks[row.name].outputs[out.name] for out in row.outputs})
        task("publish", params_all=p["params_all"], dvc_yaml=dvc_yaml, dvcignore=dvcignore, remote=remote,
             run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
             **{name: _output(tasks, collected, source) for name, source in published()})

    return spo_pipeline


def _output(tasks: dict[str, Any], collected: dict[str, Any], source: str) -> Any:
    """``<stage>.<output>`` of the tasks made so far (every cell's, for a per-cell stage: a new
    ``dsl.Collected`` for each consumer, as KFP's compiler rewrites the one it surfaces)."""
    from kfp import dsl

    if source in collected:
        return dsl.Collected(collected[source])
    stage, _, output = source.partition(".")
    return tasks[stage].outputs[output]


def _pvc_patch(platform: Platform) -> dict[str, Any]:
    patch: dict[str, Any] = {"accessModes": list(platform.workspace.access_modes)}
    if platform.workspace.storage_class:
        patch["storageClassName"] = platform.workspace.storage_class
    return patch
