"""Shared fixtures: the real data samples in ../shared/data and configs that write into tmp."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from spo.config import SpoConfig, load_config

REPO = Path(__file__).resolve().parents[1]

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
              "DVC_NO_ANALYTICS"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared_data_dir() -> Path:
    """../shared/data beside the checkout (as in CI's clone), or $SPO_SHARED_DATA."""
    candidates = [Path(os.environ["SPO_SHARED_DATA"])] if os.environ.get("SPO_SHARED_DATA") else []
    candidates.append(REPO.parent / "shared" / "data")
    for candidate in candidates:
        if (candidate / "hh" / "train.jsonl.gz").is_file():
            return candidate
    pytest.fail(f"real data samples not found in {[str(c) for c in candidates]}; set SPO_SHARED_DATA")


def read_gz(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def write_raw(folder: Path, dataset: str, split: str, lines: list[str | bytes | dict], gz: bool = False) -> Path:
    """Write raw source lines (dicts are JSON-encoded, bytes written as they are)."""
    target = folder / dataset / f"{split}.jsonl{'.gz' if gz else ''}"
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = b"".join(
        (line if isinstance(line, bytes)
         else (json.dumps(line) if isinstance(line, dict) else line).encode("utf-8")) + b"\n"
        for line in lines
    )
    target.write_bytes(gzip.compress(payload) if gz else payload)
    return target


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_data_dir()


@pytest.fixture(scope="session")
def hh_slice(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A 200-row slice of the real HH sample: 100 rows of each source split."""
    folder = tmp_path_factory.mktemp("hh_slice")
    for split in ("train", "test"):
        rows = read_gz(shared_data / "hh" / f"{split}.jsonl.gz", limit=100)
        write_raw(folder, "hh", split, rows, gz=True)
    return folder


def tmp_config(tmp_path: Path, data_dir: Path | None, *overrides: str, dataset: str = "hh") -> SpoConfig:
    """A config whose every output lands under tmp_path."""
    base = [
        f"data.dataset={dataset}",
        f"data.local_dir={data_dir}" if data_dir else "data.local_dir=null",
        f"prepare.out_dir={tmp_path}/data/prepared",
        f"prepare.quarantine_file={tmp_path}/data/quarantine/prepare.jsonl",
        f"validate.in_dir={tmp_path}/data/prepared",
        f"validate.out_dir={tmp_path}/data/validated",
        f"validate.quarantine_file={tmp_path}/data/quarantine/validate.jsonl",
        f"validate.report_dir={tmp_path}/reports/validation",
        f"validate.metrics_file={tmp_path}/metrics/validate.json",
        f"keywords.in_dir={tmp_path}/data/validated",
        f"keywords.out_dir={tmp_path}/data/keywords",
        f"keywords.metrics_file={tmp_path}/metrics/keywords.json",
        f"degrees.in_dir={tmp_path}/data/validated",
        f"degrees.keywords_dir={tmp_path}/data/keywords",
        f"degrees.out_dir={tmp_path}/data/degrees",
        f"degrees.metrics_file={tmp_path}/metrics/degrees.json",
    ]
    return load_config(None, [*base, *overrides])


@pytest.fixture
def no_data_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPO_DATA_DIR", raising=False)
