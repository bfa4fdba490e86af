"""The ``validate`` stage: each bad case lands in the quarantine with its exact reason.

Most tests share one stage run (module fixture ``mixed``) over a small prepared folder built
from real HH rows, with one injected fault per row, so the suite pays for one GX validation
rather than one per case; each test then asserts one case.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from spo.config import SpoConfig
from spo.data.formats import row_id
from spo.errors import InputError, StageFailed
from spo.io import read_jsonl, write_json, write_jsonl
from spo.stages import validate

MARKER = "\n\nAssistant:"
MB = 1_048_577


def _shared_data() -> Path | None:
    for candidate in (Path(__file__).resolve().parents[2] / "shared" / "data", os.environ.get("SPO_SHARED_DATA")):
        if candidate and (Path(candidate) / "hh" / "train.jsonl.gz").is_file():
            return Path(candidate)
    return None


def _split_dialogue(text: str) -> tuple[str, str]:
    cut = text.rindex(MARKER) + len(MARKER)
    return text[:cut], text[cut:]


def _real_pairs(n: int) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) from real HH rows; synthetic HH-shaped rows if the data is absent."""
    data = _shared_data()
    pairs: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    if data is not None:
        with gzip.open(data / "hh" / "train.jsonl.gz", "rt", encoding="utf-8") as handle:
            for line in handle:
                raw = json.loads(line)
                prompt, chosen = _split_dialogue(raw["chosen"])
                prompt_r, rejected = _split_dialogue(raw["rejected"])
                key = " ".join(prompt.split()).lower()
                if prompt != prompt_r or key in seen or chosen.strip() == rejected.strip() or len(chosen) > 2000:
                    continue
                if not chosen.strip() or not rejected.strip() or "\ufffd" in prompt:
                    continue
                seen.add(key)
                pairs.append((prompt, chosen, rejected))
                if len(pairs) == n:
                    return pairs
    for i in range(len(pairs), n):
        pairs.append((f"\n\nHuman: Question number {i}?{MARKER}", f" A helpful answer {i}.", f" Go away {i}."))
    return pairs


def _row(split: str, prompt: str, chosen: Any, rejected: Any, line: int, source: str = "hh") -> dict[str, Any]:
    return {
        "id": row_id(source, prompt, str(chosen), str(rejected)),
        "source": source,
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "group": f"g{line}",
        "origin": f"{source}/{'test' if split == 'test' else 'train'}.jsonl.gz",
        "line": line,
        "source_split": "test" if split == "test" else "train",
        "original": {"chosen": f"{prompt}{chosen}", "rejected": f"{prompt}{rejected}"},
        "split": split,
    }


def _clean_folder(n_train: int = 8, n_eval: int = 3, n_test: int = 6) -> dict[str, list[dict[str, Any]]]:
    pairs = iter(_real_pairs(n_train + n_eval + n_test))
    folder: dict[str, list[dict[str, Any]]] = {}
    line = 0
    for split, count in (("train", n_train), ("eval", n_eval), ("test", n_test)):
        folder[split] = []
        for _ in range(count):
            line += 1
            folder[split].append(_row(split, *next(pairs), line=line))
    return folder


def _config(tmp: Path, **validate: Any) -> SpoConfig:
    return SpoConfig.model_validate(
        {
            "prepare": {"out_dir": str(tmp / "prepared"), "quarantine_file": str(tmp / "quarantine" / "prepare.jsonl")},
            "validate": {
                "in_dir": str(tmp / "prepared"),
                "out_dir": str(tmp / "validated"),
                "quarantine_file": str(tmp / "quarantine" / "validate.jsonl"),
                "report_dir": str(tmp / "reports"),
                "metrics_file": str(tmp / "metrics" / "validate.json"),
                **validate,
            },
        }
    )


def _write_folder(tmp: Path, folder: dict[str, list[dict[str, Any]]], prepare_quarantined: int = 0) -> None:
    for split, rows in folder.items():
        write_jsonl(tmp / "prepared" / f"{split}.jsonl", rows)
    quarantined = [{"origin": "hh/train.jsonl.gz", "line": 900 + i, "source_split": "train",
                    "reasons": [{"field": "<line>", "reason": "not valid JSON"}], "raw": "{"}
                   for i in range(prepare_quarantined)]
    write_jsonl(tmp / "quarantine" / "prepare.jsonl", quarantined)
    prepared = sum(len(rows) for rows in folder.values())
    write_json(tmp / "prepared" / "summary.json", {
        "rows_read": prepared + prepare_quarantined, "rows_prepared": prepared,
        "rows_quarantined": prepare_quarantined,
    })


class Mixed:
    """The outcome of one run over a folder with one injected fault per marked row."""

    def __init__(self, tmp: Path) -> None:
        folder = _clean_folder()
        train = folder["train"]
        pairs = iter(_real_pairs(40)[17:])  # fresh prompts, unused by the clean rows
        self.bad: dict[str, dict[str, Any]] = {}

        def inject(name: str, split: str, row: dict[str, Any]) -> None:
            row["id"] = row_id(row["source"], str(row.get("prompt")), str(row.get("chosen")), str(row.get("rejected")))
            folder[split].append(row)
            self.bad[name] = row

        p, c, r = next(pairs)
        inject("empty", "train", _row("train", p, "", r, 101))
        p, c, r = next(pairs)
        inject("whitespace", "eval", _row("eval", p, c, "  \n\t ", 102))
        p, c, r = next(pairs)
        inject("same", "test", _row("test", p, c, c, 103))
        p, c, r = next(pairs)
        inject("huge", "train", _row("train", p, "x" * MB, r, 104))
        p, c, r = next(pairs)
        inject("surrogate", "test", _row("test", p, c, r[:5] + "\udcff" + r[5:], 105))
        p, c, r = next(pairs)
        inject("no_marker", "train", _row("train", p[: -len(MARKER)], c, r, 106))
        p, c, r = next(pairs)
        null = _row("test", p, c, r, 107)
        null["chosen"] = None
        inject("null", "test", null)
        p, c, r = next(pairs)
        missing = _row("eval", p, c, r, 108)
        del missing["rejected"]
        inject("missing", "eval", missing)
        p, c, r = next(pairs)
        inject("number", "eval", _row("eval", p, 42, r, 113))
        p, c, r = next(pairs)
        inject("two", "train", _row("train", p, "y" * MB, "\udc80" + r, 109))
        # The same prompt as a train row, with other whitespace and case: it must still match.
        body = train[2]["prompt"][: -len(MARKER)]
        shared_prompt = "  " + body.upper().replace(" ", "   ") + MARKER
        p, c, r = next(pairs)
        inject("shared", "test", _row("test", shared_prompt, c, r, 110))
        self.shared_with = train[2]["id"]
        # An exact copy of a train row later in train: the first is kept, the copy quarantined.
        self.duplicate_of = train[1]
        copy = dict(train[1], line=111)
        folder["train"].append(copy)
        self.bad["duplicate"] = copy
        # A TL;DR row: the HH marker check must not apply to it.
        tldr = _row("test", "SUBREDDIT: r/test\n\nTITLE: t\n\nPOST: p\n\nTL;DR:", " short.", " other.", 112, "tldr")
        folder["test"].append(tldr)
        self.tldr = tldr

        self.folder = folder
        self.tmp = tmp
        _write_folder(tmp, folder, prepare_quarantined=2)
        self.cfg = _config(tmp, max_bad_fraction=1.0)
        self.summary = validate.run(self.cfg)
        self.quarantine = read_jsonl(self.cfg.validate_.quarantine_file)
        self.valid = {s: read_jsonl(tmp / "validated" / f"{s}.jsonl") for s in ("train", "eval", "test")}
        self.by_line = {q["line"]: q for q in self.quarantine}

    def reasons(self, name: str) -> list[dict[str, str]]:
        return self.by_line[self.bad[name]["line"]]["reasons"]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Mixed:
    return Mixed(tmp_path_factory.mktemp("mixed"))


def test_empty_response(mixed: Mixed) -> None:
    assert mixed.reasons("empty") == [
        {"check": "expect_column_values_to_be_between", "field": "chosen",
         "reason": "chosen is empty or only whitespace"}
    ]


def test_whitespace_only_response(mixed: Mixed) -> None:
    assert mixed.reasons("whitespace") == [
        {"check": "expect_column_values_to_be_between", "field": "rejected",
         "reason": "rejected is empty or only whitespace"}
    ]


def test_chosen_equals_rejected(mixed: Mixed) -> None:
    assert mixed.reasons("same") == [
        {"check": "expect_select_column_values_to_be_unique_within_record", "field": "chosen",
         "reason": "chosen and rejected are identical"}
    ]


def test_one_megabyte_response(mixed: Mixed) -> None:
    assert mixed.reasons("huge") == [
        {"check": "expect_column_value_lengths_to_be_between", "field": "chosen",
         "reason": f"chosen length {MB} > max 20000"}
    ]


def test_lone_surrogate_is_invalid_utf8(mixed: Mixed) -> None:
    assert mixed.reasons("surrogate") == [
        {"check": "expect_column_values_to_not_match_regex", "field": "rejected",
         "reason": "rejected is not valid UTF-8: invalid byte 0xff at character 5"}
    ]
    # The quarantined row keeps the bad character (JSON-escaped), nothing is altered.
    assert "\udcff" in mixed.by_line[105]["row"]["rejected"]


def test_duplicate_id_keeps_first_copy(mixed: Mixed) -> None:
    first = mixed.duplicate_of
    assert mixed.reasons("duplicate") == [
        {"check": "expect_column_values_to_be_unique", "field": "id",
         "reason": f"duplicate id {first['id']}: the first copy (train, {first['origin']} line {first['line']}, "
                   f"id {first['id']}) is kept, this later copy is quarantined"}
    ]
    assert [r["line"] for r in mixed.valid["train"] if r["id"] == first["id"]] == [first["line"]]


def test_prompt_shared_between_train_and_test(mixed: Mixed) -> None:
    assert mixed.reasons("shared") == [
        {"check": "expect_column_values_to_not_be_in_set", "field": "prompt",
         "reason": f"prompt also occurs in train (id {mixed.shared_with}); "
                   "test rows must not share a prompt with train"}
    ]
    assert any(r["id"] == mixed.shared_with for r in mixed.valid["train"])  # the train row stays


def test_hh_prompt_without_assistant_marker(mixed: Mixed) -> None:
    [reason] = mixed.reasons("no_marker")
    assert reason["check"] == "expect_column_values_to_match_regex"
    assert reason["field"] == "prompt"
    assert reason["reason"].startswith(
        'HH prompt does not end with the assistant marker "\\n\\nAssistant:" (it ends with')


def test_tldr_prompt_needs_no_hh_marker(mixed: Mixed) -> None:
    assert mixed.tldr in mixed.valid["test"]


def test_null_field(mixed: Mixed) -> None:
    assert mixed.reasons("null") == [
        {"check": "expect_column_values_to_not_be_null", "field": "chosen", "reason": "chosen is null"}
    ]


def test_field_missing_from_one_row(mixed: Mixed) -> None:
    assert mixed.reasons("missing") == [
        {"check": "expect_column_values_to_not_be_null", "field": "rejected",
         "reason": "rejected is missing from the row"}
    ]


def test_non_string_field(mixed: Mixed) -> None:
    assert mixed.reasons("number") == [
        {"check": "expect_column_values_to_be_of_type", "field": "chosen",
         "reason": "chosen is of type int, not a string"}
    ]


def test_row_failing_two_checks_gets_both_reasons(mixed: Mixed) -> None:
    assert mixed.reasons("two") == [
        {"check": "expect_column_value_lengths_to_be_between", "field": "chosen",
         "reason": f"chosen length {MB} > max 20000"},
        {"check": "expect_column_values_to_not_match_regex", "field": "rejected",
         "reason": "rejected is not valid UTF-8: invalid byte 0x80 at character 0"},
    ]


def test_quarantine_record_shape(mixed: Mixed) -> None:
    entry = mixed.by_line[103]
    assert set(entry) == {"id", "split", "origin", "line", "reasons", "row"}
    assert entry["row"] == mixed.bad["same"]  # the full prepared row, original included
    assert entry["split"] == "test" and entry["origin"] == "hh/test.jsonl.gz"


def test_only_injected_rows_are_quarantined(mixed: Mixed) -> None:
    assert sorted(q["line"] for q in mixed.quarantine) == sorted(r["line"] for r in mixed.bad.values())


def test_counts_add_up_and_every_row_lands_once(mixed: Mixed) -> None:
    s = mixed.summary
    rows_in = sum(len(rows) for rows in mixed.folder.values())
    assert s["rows_in"] == rows_in == s["rows_valid"] + s["rows_quarantined_validate"]
    inputs = Counter((r["id"], r["line"]) for rows in mixed.folder.values() for r in rows)
    outputs = Counter((r["id"], r["line"]) for rows in mixed.valid.values() for r in rows)
    outputs.update((q["id"], q["line"]) for q in mixed.quarantine)
    assert inputs == outputs
    assert set(outputs.values()) == {1}


def test_valid_rows_unchanged_and_in_order(mixed: Mixed) -> None:
    bad_lines = {r["line"] for r in mixed.bad.values()}
    for split, rows in mixed.folder.items():
        assert mixed.valid[split] == [r for r in rows if r["line"] not in bad_lines]


def test_metrics_file(mixed: Mixed) -> None:
    metrics = json.loads(Path(mixed.cfg.validate_.metrics_file).read_text())
    rows_in = sum(len(rows) for rows in mixed.folder.values())
    assert metrics["rows_quarantined_prepare"] == 2
    assert metrics["rows_read_prepare"] == rows_in + 2
    assert metrics["rows_quarantined_validate"] == len(mixed.bad)
    assert metrics["bad_fraction"] == round((2 + len(mixed.bad)) / (rows_in + 2), 6)
    assert metrics["valid_per_split"] == {s: len(v) for s, v in mixed.valid.items()}
    assert metrics["check_failures"]["unique_id"] == 1
    assert metrics["check_failures"]["utf8:rejected"] == 2
    assert metrics["check_failures"]["no_shared_prompt:train->test"] == 1


def test_json_report(mixed: Mixed) -> None:
    report = json.loads((mixed.tmp / "reports" / "validation.json").read_text())
    items = {e["check"]: e for e in report["expectations"]}
    unique = items["unique_id"]
    assert unique["type"] == "expect_column_values_to_be_unique" and unique["column"] == "id"
    assert unique["success"] is False
    assert unique["unexpected_count"] == 2  # GX flags both copies ...
    assert unique["rows_quarantined"] == 1  # ... the first is kept
    assert unique["examples"][0]["id"] == mixed.duplicate_of["id"]
    assert items["no_shared_prompt:train->test"]["condition"] == "split == test"
    assert items["exists:id"]["success"] is True
    assert report["totals"]["rows_valid"] == mixed.summary["rows_valid"]


def test_html_report_names_failing_expectations(mixed: Mixed) -> None:
    html = (mixed.tmp / "reports" / "validation.html").read_text(encoding="utf-8")
    for name in (
        "expect_select_column_values_to_be_unique_within_record",
        "expect_column_values_to_not_match_regex",
        "expect_column_values_to_be_unique",
        "expect_column_values_to_not_be_in_set",
        "expect_column_values_to_match_regex",
        "expect_column_value_lengths_to_be_between",
        "expect_column_values_to_not_be_null",
    ):
        assert name in html
    assert "chosen and rejected are identical" in html
    assert "<script" not in html and "<link" not in html and "http" not in html  # self-contained
    assert html.index("rows valid") < html.index("<h2>Expectations</h2>")  # totals first


def test_provenance(mixed: Mixed) -> None:
    record = json.loads((mixed.tmp / "validated" / "provenance.json").read_text())
    assert record["stage"] == "validate"
    assert record["config_hash"] == mixed.cfg.section_hash("validate")
    assert set(record["inputs"]) == {"train.jsonl", "eval.jsonl", "test.jsonl", "summary.json"}


def test_bad_fraction_over_threshold_fails_after_writing(tmp_path: Path) -> None:
    folder = _clean_folder(n_train=6, n_eval=2, n_test=2)
    folder["train"][0]["chosen"] = folder["train"][0]["rejected"]
    folder["test"][0]["chosen"] = "   "
    _write_folder(tmp_path, folder, prepare_quarantined=1)
    cfg = _config(tmp_path, max_bad_fraction=0.2)  # 3 bad of 11 read > 0.2
    with pytest.raises(StageFailed) as caught:
        validate.run(cfg)
    message = str(caught.value)
    assert "3 of 11 rows" in message and "0.2727" in message
    assert "validation.html" in message and "validate.jsonl" in message
    assert "distinct_responses (1 rows)" in message
    assert len(read_jsonl(cfg.validate_.quarantine_file)) == 2
    assert len(read_jsonl(tmp_path / "validated" / "train.jsonl")) == 5
    assert (tmp_path / "reports" / "validation.html").is_file()
    metrics = json.loads((tmp_path / "metrics" / "validate.json").read_text())
    assert metrics["failed"] is True and metrics["bad_fraction"] == round(3 / 11, 6)


def test_bad_fraction_at_threshold_passes(tmp_path: Path) -> None:
    folder = _clean_folder(n_train=6, n_eval=2, n_test=2)
    folder["train"][0]["chosen"] = folder["train"][0]["rejected"]
    _write_folder(tmp_path, folder)
    summary = validate.run(_config(tmp_path, max_bad_fraction=0.1))  # 1 of 10 is not above 0.1
    assert summary["bad_fraction"] == 0.1 and summary["failed"] is False


def test_column_missing_from_every_row(tmp_path: Path) -> None:
    folder = _clean_folder(n_train=3, n_eval=1, n_test=1)
    for rows in folder.values():
        for row in rows:
            del row["source"]
    _write_folder(tmp_path, folder)
    with pytest.raises(StageFailed, match="no valid train row"):  # everything quarantined: nothing to train on
        validate.run(_config(tmp_path, max_bad_fraction=1.0))
    assert len(read_jsonl(tmp_path / "quarantine" / "validate.jsonl")) == 5
    entry = read_jsonl(tmp_path / "quarantine" / "validate.jsonl")[0]
    assert entry["reasons"] == [
        {"check": "expect_column_to_exist", "field": "source",
         "reason": "column source is missing from every input row"}
    ]
    report = json.loads((tmp_path / "reports" / "validation.json").read_text())
    marker = next(e for e in report["expectations"] if e["check"] == "hh_assistant_marker")
    assert marker["evaluated"] is False and "source" in marker["note"]


def test_missing_input_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="prepared"):
        validate.run(_config(tmp_path))


def test_missing_split_file(tmp_path: Path) -> None:
    _write_folder(tmp_path, _clean_folder(n_train=2, n_eval=1, n_test=1))
    (tmp_path / "prepared" / "eval.jsonl").unlink()
    with pytest.raises(InputError, match=r"eval\.jsonl"):
        validate.run(_config(tmp_path))


def test_inconsistent_prepare_summary_is_a_bug(tmp_path: Path) -> None:
    _write_folder(tmp_path, _clean_folder(n_train=2, n_eval=1, n_test=1))
    write_json(tmp_path / "prepared" / "summary.json", {"rows_read": 9, "rows_prepared": 4, "rows_quarantined": 0})
    with pytest.raises(RuntimeError, match="rows_read 9"):
        validate.run(_config(tmp_path))
