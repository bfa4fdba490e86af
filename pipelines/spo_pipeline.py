"""The SPO pipeline's entry point: compile it to KFP IR, one file per platform file.

``python pipelines/spo_pipeline.py`` (from any folder) rewrites the reference IR beside this script,
``spo_pipeline.<platform>.yaml`` for each ``configs/platform/*.yaml``, from the repository's
params.yaml on the placeholder image ``spo-pipeline:reference`` (``make kfp-files`` does this and
writes ``components/`` too). ``--platform``, ``--image`` and ``--out-dir`` compile for a run of
your own; ``spo pipeline compile`` is the same compile, one file at a time, with Kubernetes
manifests as an option.

The pipeline is defined in the package, :func:`spo.pipelines.dag.build_pipeline`; this script is
a file to find and run, not a module to import (pipelines/README.md says why).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from spo.pipelines.published import REFERENCE_IMAGE, write_pipelines

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main(argv: Sequence[str] | None = None) -> None:
    """Compile the pipeline for the platform files asked for (default: every reference platform file)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--platform",
        type=Path,
        action="append",
        help="a platform file (repeatable); default: every configs/platform/*.yaml",
    )
    parser.add_argument(
        "--image",
        default=REFERENCE_IMAGE,
        help="the project image; for a run, the content tag in build/image-*.ref (docs/images.md)",
    )
    parser.add_argument("--out-dir", type=Path, default=HERE, help="where spo_pipeline.<platform>.yaml go")
    args = parser.parse_args(argv)
    for path in write_pipelines(ROOT, args.out_dir, args.image, args.platform):
        print(path)


if __name__ == "__main__":
    main()
