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


def configure(params: str, compiled_params: str, overrides: List[str], data_dir: str, dataset: str, model: str,
              loss: str, spo: bool, n_levels: int, spo_lambda: float, train_steps: int, judge_backend: str,
              judge_model: str
              ) -> NamedTuple("StageParams", prepare=str, validate=str, keywords=str, degrees=str, base_model=str,
                              sft=str, train=str, generate=str, reward_model=str, judge=str, report=str,
                              params_all=str):
    from spo.pipelines.runtime import configure

    return configure(params or compiled_params, overrides, {
        "data_dir": data_dir, "dataset": dataset, "model": model, "loss": loss, "spo": spo, "n_levels": n_levels,
        "spo_lambda": spo_lambda, "train_steps": train_steps, "judge_backend": judge_backend,
        "judge_model": judge_model})


def data_version(params: str) -> str:
    from spo.pipelines.runtime import data_version

    return data_version(params)


def prepare(params: str, data_version: str, prepared: Output[Dataset], quarantine: Output[Dataset]):
    # data_version: the content of the data files it reads, only to be in KFP's cache key (runtime.data_version)
    from spo.pipelines.runtime import run_stage

    run_stage("prepare", params, {
        "prepare.out_dir": prepared.path, "prepare.quarantine_file": quarantine.path + "/prepare.jsonl"})


def validate(params: str, prepared: Input[Dataset], prepare_quarantine: Input[Dataset],
             validated: Output[Dataset], quarantine: Output[Dataset], validation: Output[Artifact],
             report: Output[HTML], metrics: Output[Metrics]):
    from spo.pipelines.runtime import copy_file, log_metrics, run_stage

    run_stage("validate", params, {
        "validate.in_dir": prepared.path, "prepare.quarantine_file": prepare_quarantine.path + "/prepare.jsonl",
        "validate.out_dir": validated.path, "validate.quarantine_file": quarantine.path + "/validate.jsonl",
        "validate.report_dir": validation.path, "validate.metrics_file": metrics.path})
    copy_file(validation.path + "/validation.html", report.path)
    log_metrics(metrics, metrics.path)


def keywords(params: str, validated: Input[Dataset], keywords: Output[Dataset],
             metrics: Output[Metrics]):
    from spo.pipelines.runtime import log_metrics, run_stage

    run_stage("keywords", params, {
        "keywords.in_dir": validated.path, "keywords.out_dir": keywords.path, "keywords.metrics_file": metrics.path})
    log_metrics(metrics, metrics.path)


def degrees(params: str, validated: Input[Dataset], keywords: Input[Dataset],
            degrees: Output[Dataset], metrics: Output[Metrics], plot: Output[Artifact], audit_plot: Output[Artifact]):
    import os

    from spo.pipelines.runtime import copy_file, log_metrics, run_stage
    from spo.stages.degrees import AUDIT_PLOT_NAME, PLOT_NAME

    run_stage("degrees", params, {
        "degrees.in_dir": validated.path, "degrees.keywords_dir": keywords.path, "degrees.out_dir": degrees.path,
        "degrees.metrics_file": metrics.path})
    copy_file(os.path.join(os.path.dirname(metrics.path), PLOT_NAME), plot.path)  # the stage writes them beside
    copy_file(os.path.join(os.path.dirname(metrics.path), AUDIT_PLOT_NAME), audit_plot.path)
    log_metrics(metrics, metrics.path)


def base_model(params: str, validated: Input[Dataset], base: Output[Model]):
    from spo.pipelines.runtime import run_stage, write_model

    run_stage("base_model", params, {"base_model.text_dir": validated.path, "base_model.out_dir": base.path})
    write_model(base)


def sft(params: str, validated: Input[Dataset], base: Input[Model], sft: Output[Model], metrics: Output[Metrics]):
    from spo.pipelines.runtime import log_metrics, model_dir, run_stage, write_model

    run_stage("sft", params, {
        "sft.rows_dir": validated.path, "sft.base_dir": model_dir(base), "sft.out_dir": sft.path,
        "sft.metrics_file": metrics.path})
    write_model(sft)
    log_metrics(metrics, metrics.path)


def train(params: str, validated: Input[Dataset], degrees: Input[Dataset], sft: Input[Model],
          checkpoints: str, loss: str, spo: bool, spo_variant: bool, policy: Output[Model], metrics: Output[Metrics]):
    from spo.pipelines.runtime import log_metrics, model_dir, run_stage, train_folder, variant_names, write_model

    name = variant_names(loss)[int(spo_variant)]  # the run's two policies: <loss>, <loss>_spo
    # on the checkpoint volume, if any: a retried (pre-empted) task resumes from the checkpoints it left there
    with train_folder(checkpoints, name, policy.path) as folder:
        run_stage("train", params, {
            "train.loss": loss, "train.spo.enabled": spo and spo_variant, "train.rows_dir": validated.path,
            "train.degrees_dir": degrees.path, "train.sft_dir": model_dir(sft), "train.out_dir": folder,
            "train.metrics_file": metrics.path})
        write_model(policy, folder)
    log_metrics(metrics, metrics.path)


def train_job(params: str, validated: Input[Dataset], degrees: Input[Dataset], sft: Input[Model],
              workspace: str, loss: str, spo: bool, spo_variant: bool, platform: str, task_config: TaskConfig,
              policy: Output[Model], metrics: Output[Metrics]):
    from spo.pipelines.train_job import run_train_job
    from spo.pipelines.runtime import discard_run_files, log_metrics, model_dir, write_model

    folder, run_folder = run_train_job(
        params=params, loss=loss, spo=spo, spo_variant=spo_variant, rows_dir=validated.path,
        degrees_dir=degrees.path, sft_dir=model_dir(sft), workspace=workspace, platform_json=platform,
        task_config=task_config, metrics_file=metrics.path)
    write_model(policy, folder)
    log_metrics(metrics, metrics.path)
    if run_folder is not None:  # on the checkpoint volume: the model is in the artifact store now
        discard_run_files(folder, run_folder)


def generate(params: str, validated: Input[Dataset], sft: Input[Model], policy: Input[Model],
             policy_spo: Input[Model], loss: str, generations: Output[Dataset], metrics: Output[Metrics]):
    from spo.pipelines.runtime import log_metrics, model_dir, run_stage, variant_names

    plain, with_spo = variant_names(loss)
    models = {"sft": model_dir(sft), plain: model_dir(policy), with_spo: model_dir(policy_spo)}
    run_stage("generate", params, {
        "generate.rows_dir": validated.path, "generate.models": models, "generate.policies": False,
        "generate.out_dir": generations.path, "generate.metrics_file": metrics.path})
    log_metrics(metrics, metrics.path)


def reward_model(params: str, validated: Input[Dataset], sft: Input[Model], reward: Output[Model],
                 metrics: Output[Metrics]):
    from spo.pipelines.runtime import log_metrics, model_dir, run_stage, write_model

    run_stage("reward_model", params, {
        "reward_model.rows_dir": validated.path, "reward_model.sft_dir": model_dir(sft),
        "reward_model.out_dir": reward.path, "reward_model.metrics_file": metrics.path})
    write_model(reward)
    log_metrics(metrics, metrics.path)


def judge(params: str, validated: Input[Dataset], generations: Input[Dataset], reward: Input[Model],
          judgments: Output[Dataset], judge_cache: Output[Artifact], winrates: Output[HTML], metrics: Output[Metrics]):
    from spo.pipelines.runtime import html_image, log_metrics, model_dir, run_stage

    run_stage("judge", params, {
        "judge.rows_dir": validated.path, "judge.generations_dir": generations.path, "judge.out_dir": judgments.path,
        "judge.reward_model_dir": model_dir(reward), "judge.metrics_file": metrics.path,
        "judge.cache_file": judge_cache.path + "/judge_cache.sqlite"})
    html_image(judgments.path + "/winrates.png", winrates.path, "Win rates")
    log_metrics(metrics, metrics.path)


def report(params: str, loss: str, validation: Input[Artifact], degrees: Input[Dataset],
           judgments: Input[Dataset], policy: Input[Model], policy_spo: Input[Model], validate_metrics: Input[Metrics],
           keywords_metrics: Input[Metrics], degrees_metrics: Input[Metrics], sft_metrics: Input[Metrics],
           train_metrics: Input[Metrics], train_spo_metrics: Input[Metrics], generate_metrics: Input[Metrics],
           reward_metrics: Input[Metrics], judge_metrics: Input[Metrics], report_md: Output[Markdown],
           report_html: Output[HTML], plots: Output[Artifact]):
    import tempfile

    from spo.pipelines.runtime import copy_file, gather, link_models, model_dir, run_stage, variant_names

    plain, with_spo = variant_names(loss)
    with tempfile.TemporaryDirectory(prefix="spo-report-") as tmp:
        metrics_dir = gather(tmp + "/metrics", {
            "validate.json": validate_metrics.path, "keywords.json": keywords_metrics.path,
            "degrees.json": degrees_metrics.path, "sft.json": sft_metrics.path, f"train_{plain}.json": train_metrics.path,
            f"train_{with_spo}.json": train_spo_metrics.path, "generate.json": generate_metrics.path,
            "reward_model.json": reward_metrics.path, "judge.json": judge_metrics.path})
        policies = link_models(tmp + "/policy", {plain: model_dir(policy), with_spo: model_dir(policy_spo)})
        run_stage("report", params, {
            "report.metrics_dir": metrics_dir, "report.judgments_dir": judgments.path, "report.policy_dir": policies,
            "report.degrees_dir": degrees.path, "report.validation_report": validation.path + "/validation.json",
            "report.out_dir": tmp + "/reports", "report.plots_dir": tmp + "/plots"})
        copy_file(tmp + "/reports/report.md", report_md.path)
        copy_file(tmp + "/reports/report.html", report_html.path)
        gather(plots.path, {".": tmp + "/plots"})  # the CSVs of `dvc plots show`


def publish(params_all: str, dvc_yaml: str, dvcignore: str, remote: str, run_id: str, loss: str,
            prepared: Input[Dataset], prepare_quarantine: Input[Dataset], validated: Input[Dataset],
            validate_quarantine: Input[Dataset], validation: Input[Artifact], validate_metrics: Input[Metrics],
            keywords: Input[Dataset], keywords_metrics: Input[Metrics], degrees: Input[Dataset],
            degrees_metrics: Input[Metrics], degrees_plot: Input[Artifact], degrees_audit_plot: Input[Artifact],
            base: Input[Model], sft: Input[Model],
            sft_metrics: Input[Metrics], policy: Input[Model], policy_spo: Input[Model], train_metrics: Input[Metrics],
            train_spo_metrics: Input[Metrics], generations: Input[Dataset], generate_metrics: Input[Metrics],
            reward: Input[Model], reward_metrics: Input[Metrics], judgments: Input[Dataset],
            judge_cache: Input[Artifact], judge_metrics: Input[Metrics], report_md: Input[Markdown], report_html: Input[HTML],
            plots: Input[Artifact], dvc_lock: Output[Artifact], params_yaml: Output[Artifact],
            results: Output[Artifact]):
    import json

    from spo.lineage.publish import publish
    from spo.pipelines.runtime import model_dir, variant_names

    plain, with_spo = variant_names(loss)
    outputs = {
        "data/prepared": prepared.path, "data/quarantine/prepare.jsonl": prepare_quarantine.path + "/prepare.jsonl",
        "data/validated": validated.path, "data/quarantine/validate.jsonl": validate_quarantine.path + "/validate.jsonl",
        "reports/validation": validation.path, "metrics/validate.json": validate_metrics.path,
        "data/keywords": keywords.path, "metrics/keywords.json": keywords_metrics.path,
        "data/degrees": degrees.path, "metrics/degrees.json": degrees_metrics.path,
        "metrics/degrees_removed_fraction.png": degrees_plot.path,
        "metrics/degrees_shortcut_audit.png": degrees_audit_plot.path, "models/base": model_dir(base),
        "models/sft": model_dir(sft), "metrics/sft.json": sft_metrics.path,
        f"models/policy/{plain}": model_dir(policy), f"metrics/train_{plain}.json": train_metrics.path,
        f"models/policy/{with_spo}": model_dir(policy_spo), f"metrics/train_{with_spo}.json": train_spo_metrics.path,
        "outputs/generations": generations.path, "metrics/generate.json": generate_metrics.path,
        "models/reward": model_dir(reward), "metrics/reward_model.json": reward_metrics.path,
        "outputs/judgments": judgments.path, "outputs/judge_cache.sqlite": judge_cache.path + "/judge_cache.sqlite",
        "metrics/judge.json": judge_metrics.path, "reports/report.md": report_md.path,
        "reports/report.html": report_html.path, "plots": plots.path,
    }
    publish(outputs=outputs, params_text=params_all, dvc_yaml=dvc_yaml, dvcignore=dvcignore,
            remote=json.loads(remote) if remote else None, run_id=run_id, dvc_lock=dvc_lock.path,
            params_yaml=params_yaml.path, results=results.path)


STEPS: dict[str, Callable[..., Any]] = {
    f.__name__: f for f in (configure, data_version, prepare, validate, keywords, degrees, base_model, sft, train, train_job, generate,
                            reward_model, judge, report, publish)
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
