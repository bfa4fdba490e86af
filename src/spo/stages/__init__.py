"""One module per pipeline stage, each exposing ``run(cfg: SpoConfig) -> dict``.

The CLI, ``dvc.yaml`` and the Kubeflow components all call these functions; nothing about a
stage's logic lives in an adapter. The stages, their order and their inputs and outputs are
written once, in :mod:`spo.stages.table`.  Modules are imported lazily so that ``spo prepare`` does
not pay for Great Expectations or torch.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from spo.stages.table import STAGES


def load_stage(name: str) -> ModuleType:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(STAGES)}")
    return importlib.import_module(f"spo.stages.{name}")
