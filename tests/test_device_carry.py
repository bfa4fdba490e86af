"""tools/device_carry.py: a file too large for one device call travels as parts with a manifest;
joining checks every part and the whole, and names the part that is missing or corrupt."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
device_carry = importlib.import_module("device_carry")
sys.path.remove(str(REPO / "tools"))

LIMIT = 1 << 20  # 1 MiB parts


@pytest.fixture()
def big(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(os.urandom(3 * LIMIT + 12345))  # 4 parts, the last one not full
    return path


def test_split_then_join_round_trip(big: Path, tmp_path: Path) -> None:
    manifest = device_carry.split_file(big, tmp_path / "carry", LIMIT)
    assert len(manifest["parts"]) == 4
    assert all(p["size"] <= LIMIT for p in manifest["parts"])
    assert sum(p["size"] for p in manifest["parts"]) == big.stat().st_size
    assert manifest["sha256"] == hashlib.sha256(big.read_bytes()).hexdigest()
    for part in manifest["parts"]:  # one folder per part: one carry path per call
        assert (tmp_path / "carry" / f"part{part['index']}" / part["name"]).is_file()
    assert json.loads((tmp_path / "carry" / "manifest.json").read_text()) == manifest
    out = device_carry.join_parts(tmp_path / "carry" / "manifest.json", [tmp_path / "carry"], tmp_path / "joined")
    assert out.read_bytes() == big.read_bytes()


def test_a_corrupt_part_fails_naming_the_part(big: Path, tmp_path: Path) -> None:
    device_carry.split_file(big, tmp_path / "carry", LIMIT)
    part = tmp_path / "carry" / "part2" / "model.gguf.part2"
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF  # same size, other bytes
    part.write_bytes(bytes(data))
    with pytest.raises(device_carry.CarryError, match=r"part 2 of 4 \(model\.gguf\.part2.*\) is corrupt.*sha256"):
        device_carry.join_parts(tmp_path / "carry" / "manifest.json", [tmp_path / "carry"], tmp_path / "joined")
    assert not (tmp_path / "joined").exists() and not (tmp_path / "joined.joining").exists()
    part.write_bytes(bytes(data[:-1]))  # truncated
    with pytest.raises(device_carry.CarryError, match=r"part 2 of 4 .* is corrupt: .* has \d+ bytes"):
        device_carry.join_parts(tmp_path / "carry" / "manifest.json", [tmp_path / "carry"], tmp_path / "joined")


def test_a_missing_part_fails_naming_the_part(big: Path, tmp_path: Path) -> None:
    device_carry.split_file(big, tmp_path / "carry", LIMIT)
    (tmp_path / "carry" / "part3" / "model.gguf.part3").unlink()
    with pytest.raises(device_carry.CarryError, match=r"part 3 of 4 \(model\.gguf\.part3.*\) is missing"):
        device_carry.join_parts(tmp_path / "carry" / "manifest.json", [tmp_path / "carry"], tmp_path / "joined")


def test_gather_over_calls_stashes_each_part_and_joins_when_all_are_there(big: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """The device plan: each call carries one part; the stash outside the repo keeps it while the
    machine is warm; the call that completes the set joins and verifies the file."""
    carry, stash = tmp_path / "carry", tmp_path / "stash"
    device_carry.split_file(big, carry, 2 * LIMIT)  # 2 parts, as for the GGUF
    manifest, joined = str(carry / "manifest.json"), str(tmp_path / "model.gguf.joined")
    first = ["gather", manifest, "--from", str(carry / "part2"), "--stash", str(stash), "--join", joined]
    assert device_carry.main(first) == device_carry.EXIT_MISSING  # the call order does not matter
    assert "part 1 of 2 (model.gguf.part1" in capsys.readouterr().err
    assert not Path(joined).exists()
    second = ["gather", manifest, "--from", str(carry / "part1"), "--stash", str(stash), "--join", joined]
    assert device_carry.main(second) == 0
    assert Path(joined).read_bytes() == big.read_bytes()


def test_gather_refuses_a_corrupt_carried_part_and_drops_a_corrupt_stashed_one(big: Path, tmp_path: Path,
                                                                                capsys: pytest.CaptureFixture) -> None:
    carry, stash = tmp_path / "carry", tmp_path / "stash"
    manifest = device_carry.split_file(big, carry, 2 * LIMIT)
    carried = carry / "part1" / "model.gguf.part1"
    carried.write_bytes(carried.read_bytes()[:-1])
    code = device_carry.main(["gather", str(carry / "manifest.json"), "--from", str(carry / "part1"),
                              "--stash", str(stash)])
    assert code == 2 and "part 1 of 2 (model.gguf.part1" in capsys.readouterr().err
    assert not (stash / "model.gguf.part1").exists()
    (stash / "model.gguf.part2").write_bytes(b"stale")  # from an earlier file
    missing = device_carry.gather(carry / "manifest.json", [], stash)
    assert [p["index"] for p in missing] == [1, 2] and not (stash / "model.gguf.part2").exists()
    assert manifest["parts"][1]["name"] == "model.gguf.part2"


def test_a_missing_manifest_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = device_carry.main(["join", str(tmp_path / "nope.json"), "--parts", str(tmp_path), "--out",
                              str(tmp_path / "x")])
    assert code == 2 and "nope.json: manifest not found" in capsys.readouterr().err
