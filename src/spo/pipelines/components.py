"""One KFP v2 component per stage, each a few lines over ``spo.stages.<stage>.run``.

``configure`` resolves the pipeline's ``params.yaml`` text, overrides and knobs once (a bad value
fails the run before any work) into one params text per stage holding only the sections that
stage reads, so KFP's cache follows exactly the params a step depends on, as DVC's does. Every
other component takes its stage's params text, maps its typed inputs and outputs onto the
stage's config paths and calls
:func:`spo.pipelines.runtime.run_stage` — the same stage function ``dvc repro`` calls — then
hands the stage's files back as artifacts (``Dataset``, ``Model``, ``Metrics``, and ``HTML`` /
``Markdown`` for the validation report and the final report, which the KFP UI renders).

``publish`` comes last: it lays every output out as a checkout holds it, records the stages in a
dvc.lock exactly as ``dvc repro`` would (spo.lineage.dvc_sync), pushes them to the platform's DVC
remote, and hands back dvc.lock, params.yaml and results.tar.gz (the files ``dvc pull`` does not
restore: metrics, reports, plots) as artifacts. ``configure`` gives it the run's whole params.yaml
(``params_all``); ``degrees`` and ``report`` hand back their plot files for it.

``train_job`` stands in for ``train`` when the platform's train pool asks for more than one node
or process: same inputs and outputs, but its pod (no GPU) runs the stage as a Kubeflow Trainer
TrainJob and follows it (spo.pipelines.train_job). Both train on the platform's checkpoint volume when
it names one, not on the run's workspace, whose per-run PVC name would keep them out of KFP's
cache (spo.pipelines.runtime.train_folder).

They are lightweight components on the project image (``install_kfp_package=False``: the image
has kfp), so the same code runs under ``kfp.local`` and on a cluster. KFP embeds each function's
source in the compiled pipeline and runs it in the container, so a body imports what it uses and
refers to nothing outside itself. This module deliberately has no ``from __future__ import
annotations``: KFP reads the parameter types from the annotations.
"""

from collections.abc import Callable
from typing import Any, List, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output, TaskConfig


# The return type is a NamedTuple call, as KFP's samples write a component's several outputs: a class
# defined beside it would not exist in the container, which runs this function's source alone.
# mypy accepts no call in an annotation, hence the ignore on that line.
def configure(params: str, compiled_params: str, overrides: List[str], data_dir: str, dataset: str, model: str,
              n_levels: int, spo_lambda: float, train_steps: int, judge_backend: str, judge_model: str
              ) -> NamedTuple("StageParams", prepare=str, validate=str, keywords=str, degrees=str, base_model=str,  # type: ignore[valid-type]
                              sft=str, reference=str, train=str, generate=str, reward_model=str, judge=str, report=str,
                              params_all=str):
    from spo.pipelines.runtime import configure

    return configure(params or compiled_params, overrides, {
        "data_dir": data_dir, "dataset": dataset, "model": model, "n_levels": n_levels, "spo_lambda": spo_lambda,
        "train_steps": train_steps, "judge_backend": judge_backend, "judge_model": judge_model}, compiled_params)


def data_version(params: str) -> str:
    from spo.pipelines.runtime import data_version

    return data_version(params)


def prepare(params: str, data_version: str, prepared: Output[Dataset], quarantine: Output[Dataset]):
    # data_version: the content of the data files it reads, only to be in KFP's cache key (runtime.data_version)
    from spo.pipelines.runtime import run_step

    run_step("prepare", params, {"prepared": prepared, "quarantine": quarantine})


def validate(params: str, prepared: Input[Dataset], prepare_quarantine: Input[Dataset],
             validated: Output[Dataset], quarantine: Output[Dataset], validation: Output[Artifact],
             report: Output[HTML], metrics: Output[Metrics]):
    from spo.pipelines.runtime import copy_file, run_step

    run_step("validate", params, {"prepared": prepared, "prepare_quarantine": prepare_quarantine,
                                  "validated": validated, "quarantine": quarantine, "validation": validation,
                                  "metrics": metrics})
    copy_file(validation.path + "/validation.html", report.path)  # the KFP UI renders an HTML artifact


def keywords(params: str, validated: Input[Dataset], keywords: Output[Dataset], metrics: Output[Metrics]):
    from spo.pipelines.runtime import run_step

    run_step("keywords", params, {"validated": validated, "keywords": keywords, "metrics": metrics})


def degrees(params: str, validated: Input[Dataset], keywords: Input[Dataset],
            degrees: Output[Dataset], metrics: Output[Metrics], plot: Output[Artifact], audit_plot: Output[Artifact]):
    from spo.pipelines.runtime import run_step

    run_step("degrees", params, {"validated": validated, "keywords": keywords, "degrees": degrees, "metrics": metrics,
                                 "plot": plot, "audit_plot": audit_plot})


def base_model(params: str, validated: Input[Dataset], base: Output[Model]):
    from spo.pipelines.runtime import run_step

    run_step("base_model", params, {"validated": validated, "base": base})


def sft(params: str, validated: Input[Dataset], base: Input[Model], sft: Output[Model], metrics: Output[Metrics]):
    from spo.pipelines.runtime import run_step

    run_step("sft", params, {"validated": validated, "base": base, "sft": sft, "metrics": metrics})


def reference(params: str, validated: Input[Dataset], sft: Input[Model], reference: Output[Dataset]):
    from spo.pipelines.runtime import run_step

    run_step("reference", params, {"validated": validated, "sft": sft, "reference": reference})


def train(params: str, validated: Input[Dataset], degrees: Input[Dataset], sft: Input[Model],
          reference: Input[Dataset], checkpoints: str, cell: str, settings: str, policy: Output[Model],
          metrics: Output[Metrics]):
    # one cell of the grid: its name and its train settings (spo.config.SpoConfig.cell_settings)
    import json

    from spo.pipelines.runtime import mark_cell, run_step, train_folder

    # on the checkpoint volume, if any: a retried (pre-empted) task resumes from the checkpoints it left there
    with train_folder(checkpoints, cell, policy.path) as folder:
        run_step("train", params, {"validated": validated, "degrees": degrees, "sft": sft, "reference": reference,
                                   "policy": policy, "metrics": metrics},
                 settings={**json.loads(settings), "train.out_dir": folder})
    mark_cell(cell, policy, metrics)


def train_job(params: str, validated: Input[Dataset], degrees: Input[Dataset], sft: Input[Model],
              reference: Input[Dataset], workspace: str, cell: str, settings: str, platform: str,
              task_config: TaskConfig, policy: Output[Model], metrics: Output[Metrics]):
    import json

    from spo.pipelines.runtime import discard_run_files, log_metrics, mark_cell, model_dir, write_model
    from spo.pipelines.train_job import run_train_job

    folder, run_folder = run_train_job(
        params=params, cell=cell, settings=json.loads(settings), rows_dir=validated.path,
        degrees_dir=degrees.path, sft_dir=model_dir(sft), reference_dir=reference.path, workspace=workspace,
        platform_json=platform, task_config=task_config, metrics_file=metrics.path)
    write_model(policy, folder)
    log_metrics(metrics, metrics.path)
    mark_cell(cell, policy, metrics)
    if run_folder is not None:  # on the checkpoint volume: the model is in the artifact store now
        discard_run_files(folder, run_folder)


def generate(params: str, validated: Input[Dataset], sft: Input[Model], policies: Input[List[Model]],
             generations: Output[Dataset], metrics: Output[Metrics]):
    from spo.pipelines.runtime import run_step

    run_step("generate", params, {"validated": validated, "sft": sft, "policies": policies,
                                  "generations": generations, "metrics": metrics})


def reward_model(params: str, validated: Input[Dataset], sft: Input[Model], reward: Output[Model],
                 metrics: Output[Metrics]):
    from spo.pipelines.runtime import run_step

    run_step("reward_model", params, {"validated": validated, "sft": sft, "reward": reward, "metrics": metrics})


def judge(params: str, validated: Input[Dataset], generations: Input[Dataset], reward: Input[Model],
          judgments: Output[Dataset], judge_cache: Output[Artifact], winrates: Output[HTML], metrics: Output[Metrics]):
    from spo.pipelines.runtime import html_image, run_step

    run_step("judge", params, {"validated": validated, "generations": generations, "reward": reward,
                               "judgments": judgments, "judge_cache": judge_cache, "metrics": metrics})
    html_image(judgments.path + "/winrates.png", winrates.path, "Win rates")


def report(params: str, validation: Input[Artifact], degrees: Input[Dataset], judgments: Input[Dataset],
           policies: Input[List[Model]], validate_metrics: Input[Metrics], keywords_metrics: Input[Metrics],
           degrees_metrics: Input[Metrics], sft_metrics: Input[Metrics], train_metrics: Input[List[Metrics]],
           generate_metrics: Input[Metrics], reward_model_metrics: Input[Metrics], judge_metrics: Input[Metrics],
           report_md: Output[Markdown], report_html: Output[HTML], plots: Output[Artifact]):
    from spo.pipelines.runtime import run_step

    run_step("report", params, {
        "validation": validation, "degrees": degrees, "judgments": judgments, "policies": policies,
        "validate_metrics": validate_metrics, "keywords_metrics": keywords_metrics,
        "degrees_metrics": degrees_metrics, "sft_metrics": sft_metrics, "train_metrics": train_metrics,
        "generate_metrics": generate_metrics, "reward_model_metrics": reward_model_metrics,
        "judge_metrics": judge_metrics, "report_md": report_md, "report_html": report_html, "plots": plots})


def publish(params_all: str, dvc_yaml: str, dvcignore: str, remote: str, run_id: str,
            prepare_prepared: Input[Dataset], prepare_quarantine: Input[Dataset], validate_validated: Input[Dataset],
            validate_quarantine: Input[Dataset], validate_validation: Input[Artifact], validate_metrics: Input[Metrics],
            keywords_keywords: Input[Dataset], keywords_metrics: Input[Metrics], degrees_degrees: Input[Dataset],
            degrees_metrics: Input[Metrics], degrees_plot: Input[Artifact], degrees_audit_plot: Input[Artifact],
            base_model_base: Input[Model], sft_sft: Input[Model], sft_metrics: Input[Metrics],
            reference_reference: Input[Dataset],
            train_policy: Input[List[Model]], train_metrics: Input[List[Metrics]],
            generate_generations: Input[Dataset], generate_metrics: Input[Metrics],
            reward_model_reward: Input[Model], reward_model_metrics: Input[Metrics], judge_judgments: Input[Dataset],
            judge_judge_cache: Input[Artifact], judge_metrics: Input[Metrics], report_report_md: Input[Markdown],
            report_report_html: Input[HTML], report_plots: Input[Artifact], dvc_lock: Output[Artifact],
            params_yaml: Output[Artifact], results: Output[Artifact]):
    # every output of the run, as <stage>_<output> (spo.stages.table.published; a list from every cell for train)
    import json

    from spo.lineage.publish import publish
    from spo.pipelines.runtime import published_outputs

    outputs = published_outputs(locals())
    publish(outputs=outputs, params_text=params_all, dvc_yaml=dvc_yaml, dvcignore=dvcignore,
            remote=json.loads(remote) if remote else None, run_id=run_id, dvc_lock=dvc_lock.path,
            params_yaml=params_yaml.path, results=results.path)


STEPS: dict[str, Callable[..., Any]] = {
    f.__name__: f for f in (configure, data_version, prepare, validate, keywords, degrees, base_model, sft, reference,
                            train, train_job, generate, reward_model, judge, report, publish)
}


# train_job reads the run's workspace PVC from its task config (to mount it in the TrainJob's pods). Naming
# any passthrough stops KFP from applying the fields not named to the task's own pod, so every field is
# named, and applied to the pod as for any other task (the TrainJob's placement comes from the platform file).
_OPTIONS: dict[str, dict[str, Any]] = {"train_job": {"task_config_passthroughs": [
    dsl.TaskConfigPassthrough(field=field, apply_to_task=True) for field in (
        dsl.TaskConfigField.KUBERNETES_VOLUMES, dsl.TaskConfigField.RESOURCES, dsl.TaskConfigField.ENV,
        dsl.TaskConfigField.KUBERNETES_NODE_SELECTOR, dsl.TaskConfigField.KUBERNETES_TOLERATIONS,
        dsl.TaskConfigField.KUBERNETES_AFFINITY)]}}


def make_components(image: str) -> dict[str, Any]:
    """The components on ``image`` (the project image: a tag or digest a cluster can pull)."""
    return {name: dsl.component(func, base_image=image, install_kfp_package=False, **_OPTIONS.get(name, {}))
            for name, func in STEPS.items()}
