"""``spo <stage>``: run one pipeline stage from params.yaml, the same function DVC and KFP call."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from spo import __version__
from spo.accelerator import require_placed_gpus
from spo.config import SpoConfig, load_config
from spo.errors import ConfigError, GpuUnavailableError, InputError, StageFailed
from spo.stages import STAGES, load_stage

log = logging.getLogger("spo")

__all__ = ["StageFailed", "main"]  # StageFailed is re-exported for callers that imported it from here


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spo", description=__doc__)
    parser.add_argument("--version", action="version", version=f"spo-pipeline {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name in STAGES:
        stage = sub.add_parser(name, help=f"run the {name} stage")
        stage.add_argument("-p", "--params", default="params.yaml", help="params file (default: params.yaml)")
        stage.add_argument(
            "-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a param, e.g. -S keywords.method=yake (repeatable)",
        )
        stage.add_argument("--json", action="store_true", help="print the stage summary as JSON on stdout")
        stage.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
        if name == "train":
            stage.add_argument("--variant", help="train this cell of the grid: the variant (from `variants`) ...")
            stage.add_argument("--seed", type=int, help="... with this training seed (dvc.yaml's matrix passes both); "
                               "its policy goes to models/policy/<variant>_s<seed>")
        if name == "judge":
            stage.add_argument("--retry-invalid", action="store_true",
                               help="ask again for the answers the cache holds without a verdict "
                               "(= -S judge.openai.retry_invalid=true; by default a rerun reuses them)")
    show = sub.add_parser("config", help="print the resolved configuration as YAML")
    show.add_argument("-p", "--params", default="params.yaml")
    show.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    grid = sub.add_parser("grid", help="the grid's size and cost (cells, steps, generations, judge calls) and its "
                          "limits, before anything is spent")
    grid.add_argument("-p", "--params", default="params.yaml")
    grid.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    grid.add_argument("--json", action="store_true", help="the same as JSON")
    res = sub.add_parser("results", help="the run's win-rate table, its judge's accuracy and where the report is")
    res.add_argument("--metrics-dir", default="metrics", help="the metrics files (default: metrics)")
    res.add_argument("--also", action="append", default=[], metavar="METRICS_DIR",
                     help="another run's metrics folder (e.g. the TL;DR run's) whose grid joins the table: loss x SPO "
                     "x data set (repeatable)")
    res.add_argument("--reports-dir", default="reports", help="where report.md/.html are (default: reports)")
    res.add_argument("--policy-dir", default="models/policy",
                     help="the policies' degree_confusion.json (default: models/policy)")
    res.add_argument("--json", action="store_true", help="the same as JSON")
    _exp_parser(sub)
    _pipeline_parser(sub)
    _trainjob_parser(sub)
    return parser


def _pipeline_parser(sub: argparse._SubParsersAction) -> None:
    pipe = sub.add_parser("pipeline",
                          help="the Kubeflow pipeline: compile it, run it locally in containers, submit it to KFP")
    pipe.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    actions = pipe.add_subparsers(dest="pipeline_command", required=True, metavar="action")
    comp = actions.add_parser("compile", help="write the pipeline YAML (or its Pipeline/PipelineVersion resources)")
    comp.add_argument("-p", "--params", default="params.yaml", help="params file: the run's defaults")
    comp.add_argument("--platform", default="configs/platform/local.yaml", help="placement, image, workspace, secrets")
    comp.add_argument("--image", help="the project image (replaces the platform file's)")
    comp.add_argument("-o", "--out", default="build/pipeline.yaml")
    comp.add_argument("--kubernetes-manifests", action="store_true",
                      help="Pipeline + PipelineVersion resources, for KFP installs that keep pipelines in Kubernetes")
    comp.add_argument("--namespace", help="namespace of the resources (--kubernetes-manifests)")
    comp.add_argument("--version", dest="version_name", help="PipelineVersion name (default: from the image tag)")
    comp.add_argument("--allow-large-grid", action="store_true", help="compile a grid over params.yaml's grid limits")
    graph = actions.add_parser("graph", help="draw a compiled pipeline's graph as a PNG (GPU steps highlighted)")
    graph.add_argument("pipeline", nargs="?", default="build/pipeline.yaml")
    graph.add_argument("-o", "--out", default="build/pipeline.png")
    local = actions.add_parser("run-local", help="run the compiled pipeline with kfp.local, in the project image")
    local.add_argument("pipeline", nargs="?", default="build/pipeline.yaml", help="the compiled pipeline YAML")
    local.add_argument("--work-dir", default="build/local-run", help="pipeline root, workspace and copied data")
    local.add_argument("--data-dir", help="folder with hh/ and tldr/ (copied into the run; default: from params)")
    local.add_argument("--runner", choices=("docker", "subprocess"), default="docker",
                       help="docker: every step in the image, no network; subprocess: in this environment")
    local.add_argument("-A", "--arg", dest="arguments", action="append", default=[], metavar="NAME=VALUE",
                       help="a pipeline parameter (YAML value), e.g. -A train_steps=50 (repeatable)")
    submit = actions.add_parser("submit", help="compile, upload (or reuse) the pipeline version, start a run on KFP")
    submit.add_argument("--host", required=True, help="the KFP URL, e.g. https://kfp.example.com (API and UI)")
    submit.add_argument("--experiment", default="spo", help="the run's experiment, created if absent (default: spo)")
    submit.add_argument("-p", "--params", default="params.yaml", help="params file: the run's defaults")
    submit.add_argument("--platform", default="configs/platform/local.yaml",
                        help="placement, image, workspace, secrets")
    submit.add_argument("--image", help="the project image (replaces the platform file's)")
    submit.add_argument("--pipeline-name", help="the pipeline's name on the server (default: the compiled one)")
    submit.add_argument("--namespace", help="profile namespace on a multi-user KFP (the pipeline, experiment, run)")
    submit.add_argument("--workload-namespace", metavar="NS", help="where the run's data volume, Secrets and launcher "
                        "Role are (the chart's release namespace): refused unless KFP will run the pods there")
    submit.add_argument("--kfp-namespace", metavar="NS", help="the namespace a single-user KFP runs in (its pods run "
                        "there), checked against --workload-namespace")
    submit.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a param override for the run, e.g. -S train.beta=0.5 (repeatable)")
    submit.add_argument("-A", "--arg", dest="arguments", action="append", default=[], metavar="NAME=VALUE",
                        help="a pipeline parameter, e.g. -A train_steps=2000 (repeatable)")
    what = submit.add_mutually_exclusive_group()
    what.add_argument("--no-run", dest="action", action="store_const", const="upload",
                      help="only upload (or reuse) the pipeline version; print its id")
    what.add_argument("--schedule", metavar="CRON", help="keep a recurring run on this cron schedule (6 fields, "
                      "seconds first, e.g. '0 0 3 * * *'), instead of one run; rerunning creates nothing new")
    what.add_argument("--check", dest="action", action="store_const", const="check",
                      help="create nothing; exit non-zero unless the version this compiles to is on the server")
    submit.add_argument("--cluster", action="store_true",
                        help="with --check: also check the cluster (the PVCs the platform file names, Kubeflow "
                        "Trainer for multi-node training) in --workload-namespace, with the pod's or kubeconfig's "
                        "credentials")
    submit.add_argument("--schedule-name", help="the recurring run's name (default: <pipeline>-schedule)")
    submit.add_argument("--store", choices=("api", "kubernetes"), default="api",
                        help="api: upload through the REST API; kubernetes: as Pipeline/PipelineVersion resources "
                        "(KFP's Kubernetes-native mode), in --namespace or the pod's")
    submit.set_defaults(action="run")
    submit.add_argument("--wait", action="store_true", help="follow the run; exit non-zero unless it succeeds")
    submit.add_argument("--allow-large-grid", action="store_true", help="submit a grid over params.yaml's grid limits")
    submit.add_argument("--timeout", type=float, default=86400.0,
                        help="seconds --wait follows the run (default: a day)")
    submit.add_argument("--token-env", default="KFP_TOKEN", help="environment variable with the bearer token")
    submit.add_argument("--token-file", default="/var/run/secrets/kubernetes.io/serviceaccount/token",
                        help="the token file read when that variable is unset (in a pod: its service account's)")


def _cluster_client() -> object:
    """The pod's or the kubeconfig's Kubernetes credentials, as the TrainJob launcher finds them."""
    from spo.cluster.launcher import custom_objects_api

    return custom_objects_api().api_client


def _trainjob_parser(sub: argparse._SubParsersAction) -> None:
    job = sub.add_parser("trainjob", help="the train stage as a Kubeflow Trainer TrainJob (multi-node training)")
    job.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    actions = job.add_subparsers(dest="trainjob_command", required=True, metavar="action")
    render = actions.add_parser("render", help="print the validated TrainJob YAML of `spo train` on the platform's "
                                "train pool, for `kubectl apply -f -`")
    render.add_argument("-p", "--params", default="params.yaml", help="params file the pods read (see --params-in-pod)")
    render.add_argument("--platform", default="configs/platform/multinode.yaml",
                        help="the platform file: the train pool's nodes, processes, GPUs, selectors, tolerations")
    render.add_argument("--name", required=True, help="the TrainJob's name (an RFC 1035 label, at most 63 characters)")
    render.add_argument("--workspace-claim", required=True,
                        help="the PersistentVolumeClaim holding the params, data and models (ReadWriteMany)")
    render.add_argument("--workspace-path", default="/kfp-workspace", help="where the pods mount it")
    render.add_argument("--params-in-pod", help="the params file's path in the pods (default: --params, which must "
                        "then lie under --workspace-path)")
    render.add_argument("--namespace", help="the TrainJob's namespace")
    render.add_argument("--image", help="the project image (replaces the platform file's)")
    render.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a param override passed to `spo train`, e.g. -S train.optim.max_steps=2000 (repeatable)")
    render.add_argument("-o", "--out", help="write the YAML here instead of stdout")


def _trainjob(args: argparse.Namespace) -> int:
    from spo.cluster.trainjob import render_trainjob

    text = render_trainjob(args.params, args.platform, name=args.name, workspace_claim=args.workspace_claim,
                           workspace_path=args.workspace_path, namespace=args.namespace, overrides=args.overrides,
                           image=args.image, params_in_pod=args.params_in_pod)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(args.out)
    else:
        sys.stdout.write(text)
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    if args.pipeline_command == "compile":
        from spo.pipelines.compile import compile_pipeline

        print(compile_pipeline(args.out, params=args.params, platform=args.platform, image=args.image,
                               kubernetes_manifests=args.kubernetes_manifests, namespace=args.namespace,
                               version=args.version_name, allow_large_grid=args.allow_large_grid))
        return 0
    if args.pipeline_command == "submit":
        from spo.pipelines.submit import submit

        submit(args.host, experiment=args.experiment, params=args.params, platform=args.platform, image=args.image,
               pipeline_name=args.pipeline_name, namespace=args.namespace, overrides=args.overrides,
               arguments=args.arguments, wait=args.wait, timeout=args.timeout, token_env=args.token_env,
               token_file=args.token_file, action="schedule" if args.schedule else args.action, schedule=args.schedule,
               schedule_name=args.schedule_name, store=args.store, workload_namespace=args.workload_namespace,
               kfp_namespace=args.kfp_namespace, cluster=_cluster_client() if args.cluster else None,
               allow_large_grid=args.allow_large_grid)
        return 0
    if args.pipeline_command == "graph":
        from spo.pipelines.graph import draw

        print(draw(args.pipeline, args.out))
        return 0
    import yaml

    from spo.pipelines.local import run_local, summary

    arguments = {}
    for item in args.arguments:
        name, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"pipeline argument {item!r} is not of the form NAME=VALUE")
        arguments[name] = yaml.safe_load(value)
    run = run_local(args.pipeline, args.work_dir, data_dir=args.data_dir, runner=args.runner, arguments=arguments)
    json.dump(summary(run), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _exp_parser(sub: argparse._SubParsersAction) -> None:
    exp = sub.add_parser("exp", help="the method's experiments as `dvc exp run` presets (experiments.yaml)")
    exp.add_argument("--presets", default="experiments.yaml", help="presets file (default: experiments.yaml)")
    exp.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    actions = exp.add_subparsers(dest="exp_command", required=True, metavar="action")
    actions.add_parser("list", help="list the presets and their runs")
    run = actions.add_parser("run", help="run (or queue) every run of a preset with `dvc exp run`")
    run.add_argument("preset")
    run.add_argument("--only", action="append", default=[], metavar="RUN", help="only this run (repeatable)")
    run.add_argument("-S", "--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                     help="an override added to every run, e.g. -S train.optim.max_steps=200")
    run.add_argument("-p", "--params", default="params.yaml")
    run.add_argument("--queue", action="store_true", help="queue the runs; start them with `dvc queue start`")
    run.add_argument("--in-workspace", action="store_true",
                     help="run in the workspace (one run), which then holds its outputs: `spo results` shows them")
    run.add_argument("-f", "--force", action="store_true", help="rerun every stage / overwrite same-named experiments")
    run.add_argument("--dry-run", action="store_true", help="check the overrides and print the commands only")
    run.add_argument("--seeds", type=_seed_list, metavar="S,S,...",
                     help="every run once per training seed (train.seed), named <preset>-<run>-s<seed>; "
                     "`spo exp summary` gives the mean and spread over them")
    summary = actions.add_parser("summary", help="`dvc exp show` as reports/experiments.{md,html,json,png}")
    summary.add_argument("-o", "--out-dir", default="reports")
    summary.add_argument("-A", "--all-commits", action="store_true", help="experiments of every commit, not only HEAD")
    summary.add_argument("--match", metavar="REGEX", help="only the experiments whose name matches, e.g. '^real'")


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: seeds are integers separated by commas, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more distinct seeds, e.g. 0,1,2")
    return seeds


def _exp(args: argparse.Namespace) -> int:
    from spo import experiments

    presets = experiments.load_presets(args.presets)
    if args.exp_command == "list":
        for name, preset in presets.items():
            print(f"{name}: {preset.description}")
            if preset.common:
                print(f"  every run: {' '.join(preset.common)}")
            for run, overrides in preset.runs.items():
                shown = " ".join(overrides) or (
                    "(the common settings only)" if preset.common else "(params.yaml as it is)")
                print(f"  {name}-{run}: {shown}")
        return 0
    if args.exp_command == "run":
        results = experiments.run_preset(
            args.preset, presets, params=args.params, only=args.only, extra=args.extra,
            queue=args.queue, force=args.force, dry_run=args.dry_run, in_workspace=args.in_workspace,
            seeds=args.seeds,
        )
        if args.dry_run:
            for result in results:
                print(" ".join(repr(c) if " " in c else c for c in result["command"]))
        return 1 if any(r["returncode"] for r in results) else 0
    rows = experiments.only_what_ran(experiments.parse_exp_show(experiments.exp_show(args.all_commits)), presets)
    if args.match:
        import re

        rows = [r for r in rows if re.search(args.match, r["name"])]
    written = experiments.write_summary(rows, args.out_dir)
    print(written["md"])
    return 0


def _grid(cfg: SpoConfig, as_json: bool) -> int:
    """``spo grid``: the size, and each limit it is over (exit 1 when over any)."""
    from spo.grid import format_grid, grid_size, over_limits

    size = grid_size(cfg)
    over = over_limits(cfg, size)
    if as_json:
        print(json.dumps({**size.as_dict(), "over_limits": over}, indent=2))
    else:
        print(format_grid(size))
        print("cells: " + ", ".join(cell.name for cell in cfg.cells()))
        for line in over:
            print(f"over a limit: {line}")
    return 1 if over else 0


def _cell(cfg: SpoConfig, args: argparse.Namespace) -> SpoConfig:
    """``spo train --variant V --seed S``: the config of that cell, once the grid is checked against
    its limits (every cell checks, so ``dvc repro`` of a grid over them trains nothing)."""
    variant, seed = getattr(args, "variant", None), getattr(args, "seed", None)
    if variant is None and seed is None:
        return cfg
    if variant is None or seed is None:
        raise ConfigError("spo train: --variant and --seed go together (one cell of the grid)")
    if seed not in cfg.grid.seeds:
        log.warning("seed %d is not in grid.seeds %s: this cell is outside the grid", seed, cfg.grid.seeds)
    from spo.grid import check_grid

    check_grid(cfg)
    return cfg.cell(variant, seed)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "exp":
            return _exp(args)
        if args.command == "pipeline":
            return _pipeline(args)
        if args.command == "trainjob":
            return _trainjob(args)
        if args.command == "results":
            from spo.results import results, win_rate_table

            found = results(args.metrics_dir, args.reports_dir, args.policy_dir, tuple(args.also))
            print(json.dumps(found, indent=2) if args.json else win_rate_table(found))
            return 0
        overrides = list(args.overrides)
        if getattr(args, "retry_invalid", False):
            overrides.append("judge.openai.retry_invalid=true")
        cfg = load_config(args.params, overrides)
        if args.command == "config":
            import yaml

            print(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))
            return 0
        if args.command == "grid":
            return _grid(cfg, args.json)
        cfg = _cell(cfg, args)
        require_placed_gpus()
        summary = load_stage(args.command).run(cfg)
    except (ConfigError, InputError, StageFailed, GpuUnavailableError) as err:
        log.error("%s", err)
        return 2
    if args.json:
        json.dump(summary, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
