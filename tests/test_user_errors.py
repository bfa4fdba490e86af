"""User errors through the CLI, as a user meets them: exit 2 and one ERROR line naming what is
wrong (the file, line, field or key), never a traceback.

These are the cases of docs/reliability.md's bad-input table that no stage test covers at the
command line; each runs ``spo.cli.main`` in-process, so an exception escaping the CLI fails the
test with its traceback.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import tmp_config

from spo.cli import main
from spo.stages import base_model, degrees, keywords, prepare, validate

TINY = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_hidden_layers=1",
        "model.tiny.num_attention_heads=2", "model.tiny.num_key_value_heads=1",
        "model.tiny.max_position_embeddings=256"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, hh_slice: Path) -> Path:
    """The data stages and a tiny base model on the real HH slice, in the layout params.yaml expects."""
    work = tmp_path_factory.mktemp("user_errors")
    cfg = tmp_config(work, hh_slice, *TINY, f"base_model.text_dir={work}/data/validated",
                     f"base_model.out_dir={work}/models/base")
    for stage in (prepare, validate, keywords, degrees, base_model):
        stage.run(cfg)
    return work


def _copy(work: Path, src: str, dst: str, change: Callable[[Path], None]) -> None:
    target = work / dst
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(work / src, target)
    change(target)


def _truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _garble_line(folder: Path, line: int = 4) -> None:
    path = folder / "train.jsonl"
    lines = path.read_text().splitlines()
    lines[line - 1] = '{"id": "x", "levels": ['
    path.write_text("\n".join(lines) + "\n")


def _drop_field(folder: Path) -> None:
    path = folder / "train.jsonl"
    lines = path.read_text().splitlines()
    row = json.loads(lines[2])
    row.pop("n_levels")
    lines[2] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")


TRAIN = ["train", "-S", "train.sft_dir=models/base", "-S", "train.out_dir=models/never",
         "-S", "train.optim.max_steps=1"]
SFT = ["sft", "-S", "sft.out_dir=models/never"]

# case: (argv, setup(work) or None, the fragment the ERROR line must hold)
CASES: dict[str, tuple[list[str], Callable[[Path], None] | None, str]] = {
    "params: a value of the wrong type": (
        ["prepare", "-S", "prepare.split.eval_fraction=abc"], None, "prepare.split.eval_fraction"),
    "params: a number out of range": (
        ["train", "-S", "train.optim.learning_rate=-1"], None, "train.optim.learning_rate"),
    "params: a string where a count goes": (["degrees", "-S", "degrees.n_levels=four"], None, "degrees.n_levels"),
    "params: an unknown choice": (["keywords", "-S", "keywords.method=bert"], None, "keywords.method"),
    "params: the params file is missing": (
        ["prepare", "--params", "nope.yaml"], None, "nope.yaml: params file not found"),
    "model: a garbled config.json": (
        [*SFT, "-S", "sft.base_dir=models/badcfg"],
        lambda w: _copy(w, "models/base", "models/badcfg", lambda f: (f / "config.json").write_text("{not json")),
        "models/badcfg"),
    "model: truncated weights": (
        [*SFT, "-S", "sft.base_dir=models/badw"],
        lambda w: _copy(w, "models/base", "models/badw", _truncate_weights), "models/badw: cannot load a causal LM"),
    "model: a name that is neither a folder nor a packaged model": (
        ["base_model", "-S", "model.name_or_path=gpt-17", "-S", "base_model.out_dir=models/never"], None, "gpt-17"),
    "degrees: a garbled line": (
        [*TRAIN, "-S", "train.degrees_dir=data/baddeg"],
        lambda w: _copy(w, "data/degrees", "data/baddeg", _garble_line), "data/baddeg/train.jsonl:4: not valid JSON"),
    "degrees: a row without its n_levels": (
        [*TRAIN, "-S", "train.degrees_dir=data/nolevels"],
        lambda w: _copy(w, "data/degrees", "data/nolevels", _drop_field), "data/nolevels/train.jsonl"),
    "degrees: the folder is missing": (
        [*TRAIN, "-S", "train.degrees_dir=data/nodeg"], None, "data/nodeg/train.jsonl: degree dataset not found"),
    "results: no judge metrics": (
        ["results", "--metrics-dir", "nowhere"], None, "nowhere/judge.json: no judge metrics"),
    "results: a garbled metrics file": (
        ["results", "--metrics-dir", "garbled"],
        lambda w: ((w / "garbled").mkdir(exist_ok=True), (w / "garbled" / "judge.json").write_text("{trunc")),
        "garbled/judge.json: not JSON"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_user_error_is_one_line_and_exit_2(case: str, workspace: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    argv, setup, fragment = CASES[case]
    monkeypatch.chdir(workspace)
    if setup is not None:
        setup(workspace)
    tiny = [] if argv[0] == "results" or "--params" in argv else [x for o in TINY for x in ("-S", o)]
    caplog.set_level(logging.ERROR)
    assert main([*argv, *tiny]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and fragment in errors[-1], errors
    assert not any(r.exc_info for r in caplog.records), "a user error must not log a traceback"
    assert not (workspace / "models" / "never").exists(), "nothing may be written for a refused run"
