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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
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
