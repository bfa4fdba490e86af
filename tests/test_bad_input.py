"""Every kind of bad input, end to end through prepare and validate: each bad row is
quarantined with a reason naming its field (or the run stops with an error naming the file),
and every input row is accounted for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import read_gz, tmp_config, write_raw

from spo.errors import InputError, StageFailed
from spo.io import read_jsonl
from spo.stages import prepare, validate


def _bad_folder(tmp_path: Path, shared_data: Path) -> tuple[Path, dict[str, int]]:
    good = read_gz(shared_data / "hh" / "train.jsonl.gz", limit=12)

    def prompt(row: dict) -> str:
        return row["chosen"][: row["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")]

    cases = {
        "malformed JSON": '{"chosen": "\\n\\nHuman: hi", ',
        "missing field": {"chosen": good[1]["chosen"]},
        "wrong type": {"chosen": good[2]["chosen"], "rejected": ["not", "a", "string"]},
        "empty response": {"chosen": good[3]["chosen"], "rejected": prompt(good[3]) + "   "},
        "invalid UTF-8": json.dumps(good[4]).encode().replace(b'"}', b'\xc3\x28"}'),
        "chosen == rejected": {"chosen": good[5]["chosen"], "rejected": good[5]["chosen"]},
        "1 MB response": {"chosen": prompt(good[0]) + " " + "x" * 1_048_576, "rejected": good[0]["rejected"]},
        "no assistant turn": {"chosen": "\n\nHuman: hello?", "rejected": "\n\nHuman: hello?"},
    }
    lines = [good[6], *cases.values(), good[7], good[8]]
    folder = tmp_path / "raw"
    write_raw(folder, "hh", "train", lines)
    write_raw(folder, "hh", "test", [good[9], good[10]])
    line_of = {name: index + 2 for index, name in enumerate(cases)}  # line 1 is a good row
    return folder, line_of


def test_each_bad_row_is_quarantined_with_its_reason_and_nothing_is_lost(tmp_path: Path, shared_data: Path) -> None:
    folder, line_of = _bad_folder(tmp_path, shared_data)
    cfg = tmp_config(tmp_path, folder, "validate.max_bad_fraction=1.0")
    read = prepare.run(cfg)["rows_read"]
    validate.run(cfg)

    prep_q = {q["line"]: q for q in read_jsonl(tmp_path / "data/quarantine/prepare.jsonl")}
    val_q = {q["line"]: q for q in read_jsonl(tmp_path / "data/quarantine/validate.jsonl")
             if q["origin"] == "hh/train.jsonl"}
    valid = [r for s in ("train", "eval", "test") for r in read_jsonl(tmp_path / "data/validated" / f"{s}.jsonl")]
    assert read == 13 and len(valid) + len(prep_q) + len(val_q) == read

    def reasons(q: dict) -> str:
        return " | ".join(f"{r['field']}: {r['reason']}" for r in q["reasons"])

    assert "not valid JSON" in reasons(prep_q[line_of["malformed JSON"]])
    assert reasons(prep_q[line_of["missing field"]]) == "rejected: missing field"
    assert reasons(prep_q[line_of["wrong type"]]) == "rejected: must be a string, got list"
    assert "no '\\n\\nAssistant:' turn" in reasons(prep_q[line_of["no assistant turn"]])
    assert "rejected is empty or only whitespace" in reasons(val_q[line_of["empty response"]])
    assert "invalid byte 0xc3" in reasons(val_q[line_of["invalid UTF-8"]])
    assert "chosen and rejected are identical" in reasons(val_q[line_of["chosen == rejected"]])
    assert "1048577" in reasons(val_q[line_of["1 MB response"]]) and "20000" in reasons(val_q[line_of["1 MB response"]])
    assert {q["line"] for q in val_q.values()} | set(prep_q) == set(line_of.values())


def test_too_many_bad_rows_fail_the_stage_after_writing_the_reports(tmp_path: Path, shared_data: Path) -> None:
    folder, _ = _bad_folder(tmp_path, shared_data)
    cfg = tmp_config(tmp_path, folder)
    prepare.run(cfg)
    with pytest.raises(StageFailed, match=r"quarantined") as failure:
        validate.run(cfg)
    assert "validation.html" in str(failure.value)
    assert (tmp_path / "reports/validation/validation.html").is_file()
    assert len(read_jsonl(tmp_path / "data/quarantine/validate.jsonl")) == 4


def test_empty_and_missing_files_stop_with_the_path(tmp_path: Path) -> None:
    folder = tmp_path / "raw"
    write_raw(folder, "hh", "train", [])
    write_raw(folder, "hh", "test", ['{"chosen": "a", "rejected": "b"}'])
    with pytest.raises(InputError, match=r"hh/train\.jsonl: file is empty"):
        prepare.run(tmp_config(tmp_path, folder))
    (folder / "hh" / "train.jsonl").unlink()
    with pytest.raises(InputError, match=r"hh/train\.jsonl\.gz: file not found"):
        prepare.run(tmp_config(tmp_path, folder))


def test_a_train_split_with_no_valid_row_fails_the_stage_even_when_bad_rows_are_allowed(
        tmp_path: Path, shared_data: Path) -> None:
    """Found by a new user: every train row invalid, max_bad_fraction raised, and validate ended with exit 0."""
    good = read_gz(shared_data / "hh" / "train.jsonl.gz", limit=1)[0]
    folder = tmp_path / "raw"
    same = {"chosen": good["chosen"], "rejected": good["chosen"]}  # equal responses: not a preference
    write_raw(folder, "hh", "train", [same, same])
    write_raw(folder, "hh", "test", [good])
    cfg = tmp_config(tmp_path, folder)
    cfg.validate_.max_bad_fraction = 1.0
    prepare.run(cfg)
    with pytest.raises(StageFailed, match=r"no valid train row .*nothing to train on"):
        validate.run(cfg)
    assert (tmp_path / "reports/validation/validation.html").is_file()  # written first, for the user to look at
