"""prepare: parsing real HH / TL;DR rows, content ids, leak-free deterministic splits, bad input."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import read_gz, tmp_config, write_raw

from spo.cli import main
from spo.data.formats import ASSISTANT, parse_hh, parse_tldr, row_id
from spo.errors import InputError
from spo.io import read_jsonl
from spo.stages import prepare


def _outputs(tmp_path: Path) -> tuple[dict[str, list[dict]], list[dict]]:
    prepared = {s: read_jsonl(tmp_path / "data/prepared" / f"{s}.jsonl") for s in ("train", "eval", "test")}
    return prepared, read_jsonl(tmp_path / "data/quarantine/prepare.jsonl")


def test_hh_rows_split_into_prompt_and_final_turn(shared_data: Path) -> None:
    for raw in read_gz(shared_data / "hh" / "train.jsonl.gz", limit=50):
        parsed = parse_hh(raw, keep_divergent=True)
        assert not parsed.problems
        assert parsed.prompt.endswith(ASSISTANT)
        assert ASSISTANT not in parsed.chosen and ASSISTANT not in parsed.rejected
        assert parsed.prompt + parsed.chosen == raw["chosen"]
        if "divergence" not in parsed.extra:
            assert parsed.prompt + parsed.rejected == raw["rejected"]


def test_first_hh_row_matches_the_worked_example(shared_data: Path) -> None:
    raw = read_gz(shared_data / "hh" / "train.jsonl.gz", limit=1)[0]
    parsed = parse_hh(raw, keep_divergent=False)
    assert parsed.chosen.startswith(" About 150 species of butterflies live in Oregon")
    assert parsed.prompt.endswith("What are some common species then?\n\nAssistant:")


def test_tldr_shared_format_and_original_openai_record_agree(shared_data: Path) -> None:
    for raw in read_gz(shared_data / "tldr" / "train.jsonl.gz", limit=30):
        shared = parse_tldr(raw)
        original = parse_tldr({k: v for k, v in raw.items() if k not in ("prompt", "chosen", "rejected")})
        assert not shared.problems and not original.problems
        assert (original.prompt, original.chosen, original.rejected) == (shared.prompt, shared.chosen, shared.rejected)
        assert shared.prompt.endswith("\n\nTL;DR:")
        assert shared.group == original.group  # grouped by Reddit post id


def test_ids_are_content_hashes() -> None:
    a = row_id("hh", "p", "c", "r")
    assert a == row_id("hh", "p", "c", "r")
    assert len({a, row_id("hh", "p", "c", "r2"), row_id("tldr", "p", "c", "r"), row_id("hh", "pc", "", "r")}) == 4


def test_prepare_on_real_slice_accounts_for_every_row(tmp_path: Path, hh_slice: Path) -> None:
    summary = prepare.run(tmp_config(tmp_path, hh_slice))
    prepared, quarantined = _outputs(tmp_path)
    assert summary["rows_read"] == 200
    assert summary["rows_read"] == sum(len(v) for v in prepared.values()) + len(quarantined)
    assert len(prepared["test"]) >= 95 and prepared["eval"], "eval is carved out of train"
    for split, rows in prepared.items():
        for row in rows:
            assert row["split"] == split and row["source"] == "hh"
            assert row["id"] == row_id("hh", row["prompt"], row["chosen"], row["rejected"])
            assert row["original"]["chosen"] == row["prompt"] + row["chosen"]
            assert row["origin"] == f"hh/{row['source_split']}.jsonl.gz" and row["line"] >= 1


def test_splits_are_deterministic_and_never_share_a_prompt_group(tmp_path: Path, shared_data: Path) -> None:
    prepare.run(tmp_config(tmp_path / "a", shared_data))
    prepare.run(tmp_config(tmp_path / "b", shared_data))
    for split in ("train", "eval", "test"):
        a = (tmp_path / "a/data/prepared" / f"{split}.jsonl").read_bytes()
        assert a == (tmp_path / "b/data/prepared" / f"{split}.jsonl").read_bytes()
    prepared, _ = _outputs(tmp_path / "a")
    splits_of_group: dict[str, set[str]] = defaultdict(set)
    splits_of_prompt: dict[str, set[str]] = defaultdict(set)
    for split, rows in prepared.items():
        for row in rows:
            splits_of_group[row["group"]].add(split)
            splits_of_prompt[row["prompt"]].add(split)
    assert all(len(s) == 1 for s in splits_of_group.values())
    assert all(len(s) == 1 for s in splits_of_prompt.values())
    n_train, n_eval = len(prepared["train"]), len(prepared["eval"])
    assert 0.07 < n_eval / (n_train + n_eval) < 0.13


def test_hash_mode_assigns_whole_groups(tmp_path: Path, hh_slice: Path) -> None:
    prepare.run(tmp_config(tmp_path, hh_slice, "prepare.split.mode=hash", "prepare.split.test_fraction=0.3"))
    prepared, _ = _outputs(tmp_path)
    groups = {split: {r["group"] for r in rows} for split, rows in prepared.items()}
    assert not (groups["train"] & groups["test"]) and not (groups["eval"] & groups["test"])
    assert 30 < len(prepared["test"]) < 90


def test_divergent_hh_rows_are_quarantined_or_kept_with_their_context(tmp_path: Path, shared_data: Path) -> None:
    rows = read_gz(shared_data / "hh" / "train.jsonl.gz")
    divergent = [r for r in rows
                 if not parse_hh(r, keep_divergent=True).problems and "divergence" in parse_hh(r, True).extra]
    assert len(divergent) == 6  # documented in shared/data/README.md
    folder = tmp_path / "raw"
    write_raw(folder, "hh", "train", divergent[:3] + rows[:2])
    write_raw(folder, "hh", "test", rows[2:4])

    prepare.run(tmp_config(tmp_path / "q", folder))
    prepared, quarantined = _outputs(tmp_path / "q")
    assert len(quarantined) == 3 and sum(len(v) for v in prepared.values()) == 4
    assert all("diverge before the final Assistant turn" in q["reasons"][0]["reason"] for q in quarantined)
    assert [q["line"] for q in quarantined] == [1, 2, 3]

    prepare.run(tmp_config(tmp_path / "k", folder, "prepare.hh_divergence=keep"))
    prepared, quarantined = _outputs(tmp_path / "k")
    kept = [r for rows_ in prepared.values() for r in rows_ if "divergence" in r]
    assert not quarantined and len(kept) == 3
    for row in kept:
        assert row["divergence"]["rejected_prompt"] + row["rejected"] == row["original"]["rejected"]


def test_bad_raw_lines_are_quarantined_with_file_line_and_field(tmp_path: Path, shared_data: Path) -> None:
    good = read_gz(shared_data / "hh" / "train.jsonl.gz", limit=3)
    folder = tmp_path / "raw"
    write_raw(
        folder,
        "hh",
        "train",
        [
            good[0],
            '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: hello", "rejected": ',  # malformed JSON
            {"chosen": good[1]["chosen"]},  # missing field
            {"chosen": good[1]["chosen"], "rejected": 42},  # wrong type
            {"chosen": "\n\nHuman: hi there", "rejected": "\n\nHuman: hi there"},  # no assistant turn
            "[1, 2]",  # not an object
            {"chosen": None, "rejected": good[2]["rejected"]},  # null
        ],
    )
    write_raw(folder, "hh", "test", [good[2]])
    summary = prepare.run(tmp_config(tmp_path, folder))
    prepared, quarantined = _outputs(tmp_path)
    assert summary["rows_read"] == 8 and len(quarantined) == 6
    assert sum(len(v) for v in prepared.values()) == 2
    by_line = {q["line"]: q for q in quarantined}
    assert all(q["origin"] == "hh/train.jsonl" for q in quarantined)
    assert by_line[2]["reasons"][0]["reason"].startswith("not valid JSON")
    assert by_line[3]["reasons"] == [{"field": "rejected", "reason": "missing field"}]
    assert by_line[4]["reasons"] == [{"field": "rejected", "reason": "must be a string, got int"}]
    assert {r["field"] for r in by_line[5]["reasons"]} == {"chosen", "rejected"}
    assert "no '\\n\\nAssistant:' turn" in by_line[5]["reasons"][0]["reason"]
    assert by_line[6]["reasons"][0]["reason"] == "a JSON list, not an object"
    assert by_line[7]["reasons"] == [{"field": "chosen", "reason": "is null"}]


@pytest.mark.parametrize("gz", [False, True])
def test_a_bom_is_no_bad_row_and_blank_lines_are_counted_not_quarantined(tmp_path: Path, shared_data: Path,
                                                                         gz: bool) -> None:
    """Found by a new user: a file saved with a UTF-8 BOM lost its first (good) row to quarantine.
    Blank or whitespace-only lines hold no row: they are skipped and counted as ``blank_lines``
    (issue 21: quarantined as bad rows they failed validation of a clean folder), never dropped
    uncounted."""
    good = read_gz(shared_data / "hh" / "train.jsonl.gz", limit=4)
    folder = tmp_path / "raw"
    first = b"\xef\xbb\xbf" + json.dumps(good[0]).encode()
    write_raw(folder, "hh", "train", [first, good[1], "", "   \t", good[2]], gz=gz)
    write_raw(folder, "hh", "test", [good[3], ""], gz=gz)
    summary = prepare.run(tmp_config(tmp_path, folder))
    prepared, quarantined = _outputs(tmp_path)
    assert (summary["rows_read"], summary["blank_lines"], summary["rows_quarantined"]) == (4, 3, 0)
    assert sum(len(v) for v in prepared.values()) == 4  # the BOM row is prepared
    assert not quarantined
    written = json.loads((tmp_path / "data/prepared/summary.json").read_text())
    assert written["blank_lines"] == 3 and written["rows_read"] == 4


def test_blank_lines_do_not_count_towards_the_bad_fraction(tmp_path: Path, shared_data: Path) -> None:
    """Issue 21: 41 good rows and 3 blank lines (trailing newlines, a separator) failed validation at
    6.8% bad; they are no rows, so the folder validates with 0 bad and every row is used."""
    from spo.stages import validate

    good = read_gz(shared_data / "hh" / "train.jsonl.gz", limit=41)
    folder = tmp_path / "raw"
    write_raw(folder, "hh", "train", [*good[:20], "", *good[20:36], "  ", ""], gz=False)
    write_raw(folder, "hh", "test", good[36:], gz=False)
    cfg = tmp_config(tmp_path, folder)
    summary = prepare.run(cfg)
    assert (summary["rows_read"], summary["blank_lines"]) == (41, 3)
    checked = validate.run(cfg)
    assert checked["bad_fraction"] == 0.0
    assert sum(len(read_jsonl(p)) for p in (tmp_path / "data/validated").glob("*.jsonl")) == 41


def test_invalid_utf8_bytes_survive_prepare_for_validation_to_quarantine(tmp_path: Path, shared_data: Path) -> None:
    good = read_gz(shared_data / "hh" / "train.jsonl.gz", limit=2)
    broken = json.dumps(good[0]).encode().replace(b"butterflies live", b"butter\xff\xfeflies live", 1)
    folder = tmp_path / "raw"
    write_raw(folder, "hh", "train", [broken])
    write_raw(folder, "hh", "test", [good[1]])
    prepare.run(tmp_config(tmp_path, folder))
    prepared, quarantined = _outputs(tmp_path)
    rows = [r for v in prepared.values() for r in v]
    assert not quarantined and len(rows) == 2
    assert any("\udcff\udcfe" in r["chosen"] for r in rows)


def test_empty_and_missing_files_are_clear_errors(tmp_path: Path, shared_data: Path) -> None:
    folder = tmp_path / "raw"
    write_raw(folder, "hh", "train", read_gz(shared_data / "hh" / "train.jsonl.gz", limit=1))
    with pytest.raises(InputError, match=r"hh/test\.jsonl\.gz: file not found"):
        prepare.run(tmp_config(tmp_path, folder))
    (folder / "hh" / "test.jsonl").write_bytes(b"")
    with pytest.raises(InputError, match=r"hh/test\.jsonl: file is empty"):
        prepare.run(tmp_config(tmp_path, folder))
    with pytest.raises(InputError, match="data folder not found"):
        prepare.run(tmp_config(tmp_path, tmp_path / "nowhere"))


def test_corrupt_gzip_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "raw"
    write_raw(folder, "hh", "train", ['{"chosen": "a", "rejected": "b"}'])
    (folder / "hh" / "test.jsonl.gz").write_bytes(gzip.compress(b'{"a": 1}\n')[:-6])
    with pytest.raises(InputError, match=r"test\.jsonl\.gz: cannot be read"):
        prepare.run(tmp_config(tmp_path, folder))


def test_cli_exits_2_naming_the_missing_file(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                             no_data_env: None) -> None:
    folder = tmp_path / "raw"
    (folder / "hh").mkdir(parents=True)
    code = main(["prepare", "-p", str(tmp_path / "none.yaml"), "-S", f"data.local_dir={folder}"])
    assert code == 2
    assert "none.yaml: params file not found" in caplog.text
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  local_dir: {folder}\nprepare:\n  out_dir: {tmp_path}/out\n")
    assert main(["prepare", "-p", str(params)]) == 2
    assert "hh/train.jsonl.gz: file not found" in caplog.text


def test_env_var_wins_over_params(tmp_path: Path, hh_slice: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPO_DATA_DIR", str(hh_slice))
    cfg = tmp_config(tmp_path, tmp_path / "nowhere")
    assert cfg.data.resolved_local_dir() == hh_slice
    assert prepare.run(cfg)["rows_read"] == 200


def test_tldr_prepare_groups_by_post(tmp_path: Path, shared_data: Path) -> None:
    summary = prepare.run(tmp_config(tmp_path, shared_data, "data.max_rows_per_split=150", dataset="tldr"))
    prepared, quarantined = _outputs(tmp_path)
    assert summary["rows_read"] == 300 and not quarantined
    posts: dict[str, set[str]] = defaultdict(set)
    for split, rows in prepared.items():
        for row in rows:
            assert row["prompt"].startswith("SUBREDDIT: r/") and row["original"]["info"]["id"]
            posts[row["original"]["info"]["id"]].add(split)
    assert all(len(s) == 1 for s in posts.values())


def test_repeated_tldr_pairs_are_merged_not_lost(tmp_path: Path, shared_data: Path) -> None:
    """TL;DR pairs labelled by several workers share a content id: one row lists the others."""
    summary = prepare.run(tmp_config(tmp_path, shared_data, dataset="tldr"))
    prepared, quarantined = _outputs(tmp_path)
    rows = [r for v in prepared.values() for r in v]
    assert summary["rows_merged"] > 0 and summary["pairs_disagreeing"] > 0  # both happen in the real sample
    assert summary["rows_read"] == len(rows) + summary["rows_merged"] + summary["rows_outvoted"] + len(quarantined)
    assert len({r["id"] for r in rows}) == len(rows)
    merged = [m for r in rows for m in r.get("merged", [])]
    assert len(merged) == summary["rows_merged"]
    assert all(m["original"]["worker"] and m["line"] >= 1 for m in merged)


def _swapped(row: dict, worker: str) -> dict:
    """The same TL;DR comparison, with the other summary preferred (the shared format's fields)."""
    return {**row, "chosen": row["rejected"], "rejected": row["chosen"], "worker": worker}


@pytest.mark.parametrize("mode", ["majority", "keep", "quarantine"])
def test_pairs_labelled_both_ways_are_settled_and_counted(tmp_path: Path, shared_data: Path, mode: str) -> None:
    """Found by a new user: the same pair with opposite preferences entered training as two rows,
    unflagged.  Here pair P is read 3 times one way and once the other (majority: 3 to 1), pair Q
    once each way (a tie), and every raw row is accounted for in the summary's identity."""
    rows = read_gz(shared_data / "tldr" / "train.jsonl.gz", limit=40)
    seen, distinct = set(), []
    for r in rows:
        key = (r["prompt"], *sorted((r["chosen"], r["rejected"])))
        if key not in seen:
            seen.add(key)
            distinct.append(r)
    p, q, other = distinct[0], distinct[1], distinct[2:6]
    raw = [p, {**p, "worker": "w2"}, _swapped(p, "w3"), {**p, "worker": "w4"}, q, _swapped(q, "w5"), *other]
    folder = tmp_path / "raw"
    write_raw(folder, "tldr", "train", raw)
    write_raw(folder, "tldr", "test", [distinct[6]])
    other = [*other, distinct[6]]
    raw = [*raw, distinct[6]]
    summary = prepare.run(tmp_config(tmp_path, folder, f"prepare.disagreement={mode}", dataset="tldr"))
    prepared, quarantined = _outputs(tmp_path)
    out = [r for v in prepared.values() for r in v]
    assert summary["pairs_disagreeing"] == 2
    assert summary["rows_read"] == len(raw) == (
        len(out) + summary["rows_merged"] + summary["rows_outvoted"] + len(quarantined))
    p_id = row_id("tldr", p["prompt"], p["chosen"], p["rejected"])
    p_swapped = row_id("tldr", p["prompt"], p["rejected"], p["chosen"])
    by_id = {r["id"]: r for r in out}
    if mode == "majority":
        assert p_swapped not in by_id
        assert by_id[p_id]["disagreement"] == {"other_id": p_swapped, "votes_for": 3, "votes_against": 1}
        assert [c["original"]["worker"] for c in by_id[p_id]["outvoted"]] == ["w3"]
        assert len(quarantined) == 2 and {c["raw"]["worker"] for c in quarantined} == {q["worker"], "w5"}
        assert all("annotators disagree" in c["reasons"][0]["reason"] and "a tie" in c["reasons"][0]["reason"]
                   for c in quarantined)
        assert len(out) == 1 + len(other)
    elif mode == "keep":
        assert by_id[p_id]["disagreement"]["votes_for"] == 3 and by_id[p_swapped]["disagreement"]["votes_for"] == 1
        assert not quarantined and summary["rows_outvoted"] == 0 and len(out) == 4 + len(other)
    else:
        assert len(quarantined) == 6 and len(out) == len(other)
        assert sorted(c["line"] for c in quarantined) == [1, 2, 3, 4, 5, 6]
