"""The repository's published KFP files: ``pipelines/`` (compiled IR) and ``components/`` (component specs).

A KFP user opening the repository looks for the pipeline's compiled IR and for component specs
other pipelines can load in top-level ``pipelines/`` and ``components/`` (as KFP's samples and
InstructLab's pipeline do). Those folders hold generated files only, so this module writes them
from the one source of truth, :func:`spo.pipelines.dag.build_pipeline` (through
:func:`spo.pipelines.compile.compile_pipeline`, exactly as ``spo pipeline compile`` does) and
:func:`spo.pipelines.components.make_components`; ``make kfp-files`` runs it and
tests/test_published_kfp_files.py checks the committed files are current.

The files must be the same bytes on every machine, so they are compiled from the repository's
params.yaml and ``configs/platform/*.yaml`` with one fixed image, :data:`REFERENCE_IMAGE`. That
tag is a placeholder that can move (``spo pipeline compile`` warns about such tags: KFP's cache
key holds the image string), and the warning is silenced for it on purpose: these files are for
reading, diffing and loading; a run compiles its own pipeline on the content tag ``make image``
writes (``spo pipeline compile --image "$(cat build/image-cpu.ref)"``, docs/images.md).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

# A stand-in for the project image, never a real build: a content tag or digest would claim an image that
# does not exist, and a version tag would be stale after every release.
REFERENCE_IMAGE = "spo-pipeline:reference"
PIPELINE_STEM = "spo_pipeline"  # pipelines/spo_pipeline.py compiles to pipelines/spo_pipeline.<platform>.yaml
PLATFORM_GLOB = "configs/platform/*.yaml"


class _DropImageWarning(logging.Filter):
    """Drops compile's moving-tag warning for one image only (any other record goes through)."""

    def __init__(self, image: str) -> None:
        super().__init__()
        self.image = image

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and self.image in record.getMessage())


@contextmanager
def _quiet_about(image: str) -> Iterator[None]:
    log = logging.getLogger("spo.pipeline")
    drop = _DropImageWarning(image)
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def reference_platforms(root: Path) -> list[Path]:
    """The reference platform files, sorted (the order, like everything else here, must not depend on the machine)."""
    return sorted(root.glob(PLATFORM_GLOB))


def write_pipelines(
    root: Path, out_dir: Path, image: str = REFERENCE_IMAGE, platforms: Sequence[Path] | None = None
) -> list[Path]:
    """Compile ``root``'s params.yaml for each platform file into ``out_dir/spo_pipeline.<platform>.yaml``."""
    from spo.pipelines.compile import compile_pipeline

    written = []
    with _quiet_about(REFERENCE_IMAGE):  # only the placeholder: a real image that can move is still warned about
        for platform in platforms if platforms is not None else reference_platforms(root):
            written.append(
                compile_pipeline(
                    out_dir / f"{PIPELINE_STEM}.{platform.stem}.yaml",
                    params=root / "params.yaml",
                    platform=platform,
                    image=image,
                )
            )
    return written


def write_components(out_dir: Path, image: str = REFERENCE_IMAGE) -> list[Path]:
    """Compile every step's component into ``out_dir/<step>/component.yaml`` (KFP's own format, loadable with
    ``kfp.components.load_component_from_file``)."""
    from kfp import compiler

    from spo.pipelines.components import make_components

    written = []
    for name, component in sorted(make_components(image).items()):
        path = out_dir / name / "component.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        compiler.Compiler().compile(component, str(path))
        written.append(path)
    return written


def prune(folder: Path, pattern: str, keep: Sequence[Path]) -> list[Path]:
    """Delete the files under ``folder`` matching ``pattern`` that are not in ``keep`` (a step or platform file
    that is gone takes its generated file with it), and the folders that leaves empty."""
    kept = {path.resolve() for path in keep}
    removed = [path for path in sorted(folder.glob(pattern)) if path.resolve() not in kept]
    for path in removed:
        path.unlink()
        if path.parent != folder and not any(path.parent.iterdir()):
            path.parent.rmdir()
    return removed


def generate(root: Path, image: str = REFERENCE_IMAGE) -> list[Path]:
    """Rewrite ``root/pipelines/spo_pipeline.*.yaml`` and ``root/components/*/component.yaml``, pruning stale ones."""
    pipelines = write_pipelines(root, root / "pipelines", image)
    components = write_components(root / "components", image)
    prune(root / "pipelines", f"{PIPELINE_STEM}.*.yaml", pipelines)
    prune(root / "components", "*/component.yaml", components)
    return pipelines + components


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m spo.pipelines.published``: regenerate ``pipelines/*.yaml`` and ``components/`` (make kfp-files)."""
    parser = argparse.ArgumentParser(prog="python -m spo.pipelines.published", description=main.__doc__)
    parser.add_argument("--root", type=Path, default=Path("."), help="the repository (params.yaml, configs/platform)")
    parser.add_argument("--image", default=REFERENCE_IMAGE, help="the image the files name")
    args = parser.parse_args(argv)
    for path in generate(args.root, args.image):
        print(path)


if __name__ == "__main__":
    main()
