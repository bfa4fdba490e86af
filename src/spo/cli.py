"""``spo <stage>``: run one pipeline stage from params.yaml, the same function DVC and KFP call."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from spo import __version__
from spo.config import ConfigError, load_config
from spo.errors import StageFailed
from spo.io import InputError
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
    show = sub.add_parser("config", help="print the resolved configuration as YAML")
    show.add_argument("-p", "--params", default="params.yaml")
    show.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _exp_parser(sub)
    _pipeline_parser(sub)
    return parser


def _pipeline_parser(sub: argparse._SubParsersAction) -> None:
    pipe = sub.add_parser("pipeline", help="the Kubeflow pipeline: compile it, run it locally in containers")
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


def _pipeline(args: argparse.Namespace) -> int:
    if args.pipeline_command == "compile":
        from spo.pipelines.compile import compile_pipeline

        print(compile_pipeline(args.out, params=args.params, platform=args.platform, image=args.image,
                               kubernetes_manifests=args.kubernetes_manifests, namespace=args.namespace,
                               version=args.version_name))
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
    run.add_argument("-f", "--force", action="store_true", help="rerun every stage / overwrite same-named experiments")
    run.add_argument("--dry-run", action="store_true", help="check the overrides and print the commands only")
    summary = actions.add_parser("summary", help="`dvc exp show` as reports/experiments.{md,html,json,png}")
    summary.add_argument("-o", "--out-dir", default="reports")
    summary.add_argument("-A", "--all-commits", action="store_true", help="experiments of every commit, not only HEAD")


def _exp(args: argparse.Namespace) -> int:
    from spo import experiments

    presets = experiments.load_presets(args.presets)
    if args.exp_command == "list":
        for name, preset in presets.items():
            print(f"{name}: {preset.description}")
            for run, overrides in preset.runs.items():
                print(f"  {name}-{run}: {' '.join(overrides) or '(params.yaml as it is)'}")
        return 0
    if args.exp_command == "run":
        results = experiments.run_preset(
            args.preset, presets, params=args.params, only=args.only, extra=args.extra,
            queue=args.queue, force=args.force, dry_run=args.dry_run,
        )
        if args.dry_run:
            for result in results:
                print(" ".join(repr(c) if " " in c else c for c in result["command"]))
        return 1 if any(r["returncode"] for r in results) else 0
    rows = experiments.parse_exp_show(experiments.exp_show(args.all_commits))
    written = experiments.write_summary(rows, args.out_dir)
    print(written["md"])
    return 0


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
        cfg = load_config(args.params, args.overrides)
        if args.command == "config":
            import yaml

            print(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))
            return 0
        summary = load_stage(args.command).run(cfg)
    except (ConfigError, InputError, StageFailed) as err:
        log.error("%s", err)
        return 2
    if args.json:
        json.dump(summary, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
