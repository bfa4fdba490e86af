"""Tokenisation, degree-variant alignment, batching and input checks of spo.training.data."""

from __future__ import annotations

import pytest
import torch
from test_train_support import hh_pairs, tiny_model

from spo.io import InputError
from spo.training.data import PairCollator, check_alignment, epoch_batches, sample_levels, tokenize_pairs


def _examples(mode: str | None, **kw):
    rows, degs = hh_pairs()
    tok, _ = tiny_model()
    args = dict(max_length=96, max_prompt_length=48, degree_mode=mode, **kw)
    return tok, rows, degs, *tokenize_pairs(rows, degs, tok, **args)


def test_truncation_rules_and_labels() -> None:
    tok, rows, _, examples, stats = _examples(None)
    assert stats.pairs == len(rows) and stats.prompts_truncated > 0 and stats.responses_truncated > 0
    for ex in examples:
        assert len(ex.prompt_ids) <= 48
        assert len(ex.prompt_ids) + len(ex.chosen_ids) <= 96 and len(ex.prompt_ids) + len(ex.rejected_ids) <= 96
    # the prompt keeps its end: the generation prompt that the response follows
    assert tok.decode(examples[0].prompt_ids).endswith("<|assistant|>")
    batch = PairCollator(tok.pad_token_id)(examples[:3], [0, 1, 2])
    assert batch.input_ids.shape[0] == 6
    for row, ex in enumerate(examples[:3]):
        n_p, n_r = len(ex.prompt_ids), len(ex.chosen_ids)
        assert (batch.labels[row, :n_p] == -100).all()
        assert batch.labels[row, n_p: n_p + n_r].tolist() == ex.chosen_ids
        assert (batch.labels[row, n_p + n_r:] == -100).all() and (batch.attention_mask[row, n_p + n_r:] == 0).all()


def test_reencode_positions_point_at_the_same_original_tokens() -> None:
    tok, *_ , examples, stats = _examples("reencode")
    same = total = 0
    for ex in examples:
        for side, sd in ex.degrees.items():
            if not sd.distinct:
                continue
            orig = ex.chosen_ids if side == "chosen" else ex.rejected_ids
            assert len(sd.variant_ids) == sd.n_levels - 1
            for ids, pos in zip(sd.variant_ids, sd.variant_pos):
                assert len(ids) == len(pos) and pos == sorted(pos)  # monotone
                for token, p in zip(ids, pos):
                    if p < len(orig) and tok.decode([token]).strip().isalpha():
                        total += 1
                        same += tok.decode([token]) == tok.decode([orig[p]])
    assert total > 500 and same / total > 0.9, (same, total)
    assert stats.not_distinct > 0


def test_drop_masks_are_nested_and_level0_keeps_all() -> None:
    _, rows, degs, examples, _ = _examples("drop")
    for ex in examples:
        for side, sd in ex.degrees.items():
            if not sd.distinct:
                assert sd.keep == []
                continue
            assert all(sd.keep[0])
            for k in range(1, sd.n_levels):
                assert all(b <= a for a, b in zip(sd.keep[k - 1], sd.keep[k]))  # level k+1 drops more
            assert sum(sd.keep[-1]) < len(sd.keep[-1])


def test_collator_degree_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    tok, *_, examples, _ = _examples("reencode")
    collate = PairCollator(tok.pad_token_id, "reencode", levels_per_step=None)
    idx = [i for i, ex in enumerate(examples) if all(sd.distinct for sd in ex.degrees.values())][:2]
    batch = collate([examples[i] for i in idx], idx)
    # 4 alignment rows + 3 variants x 2 sides x 2 pairs; 4 levels x 2 sides x 2 pairs degree rows
    assert batch.input_ids.shape[0] == 4 + 12 and batch.deg_row.numel() == 16
    level0 = batch.deg_label == 0
    assert (batch.deg_row[level0] < 4).all() and (batch.deg_row[~level0] >= 4).all()
    sampled = PairCollator(tok.pad_token_id, "reencode", levels_per_step=2)(
        [examples[i] for i in idx], idx, step=3)
    assert sampled.deg_row.numel() == 8 and (sampled.deg_label == 0).sum() == 4
    assert sample_levels(4, 2, 0, 3, 7, "chosen") == sample_levels(4, 2, 0, 3, 7, "chosen")


def test_epoch_batches_deterministic_and_complete() -> None:
    lengths = list(range(50))
    a = epoch_batches(lengths, 8, 4, seed=1, epoch=0, group_by_length=True)
    assert a == epoch_batches(lengths, 8, 4, seed=1, epoch=0, group_by_length=True)
    assert a != epoch_batches(lengths, 8, 4, seed=1, epoch=1, group_by_length=True)
    flat = [i for b in a for i in b]
    assert len(a) == 6 and len(set(flat)) == 48
    plain = epoch_batches(lengths, 8, 4, seed=1, epoch=0, group_by_length=False)
    assert len(plain) == 6 and len({i for b in plain for i in b}) == 48


def test_misaligned_degree_dataset_names_both_files() -> None:
    rows, degs = hh_pairs()
    swapped = [degs[1], degs[0], *degs[2:]]
    with pytest.raises(InputError, match=r"deg.jsonl:1 does not match rows.jsonl:1: degree id 'hh-1' != row id 'hh-0'"):
        check_alignment("rows.jsonl", rows, "deg.jsonl", swapped)
    with pytest.raises(InputError, match=r"has 79 lines but rows.jsonl has 80 rows: at line 80"):
        check_alignment("rows.jsonl", rows, "deg.jsonl", degs[:-1])


def test_empty_after_filtering_is_an_error() -> None:
    rows, _ = hh_pairs()
    tok, _ = tiny_model()
    same = [{**r, "rejected": r["chosen"]} for r in rows[:5]]
    with pytest.raises(InputError, match="no usable pair left"):
        tokenize_pairs(same, None, tok, max_length=96, max_prompt_length=48, where="x.jsonl")
    with pytest.raises(InputError, match="max_prompt_length"):
        tokenize_pairs(rows, None, tok, max_length=48, max_prompt_length=48)
    with pytest.raises(InputError, match="no degree dataset"):
        tokenize_pairs(rows, None, tok, max_length=96, max_prompt_length=48, degree_mode="drop")


def test_kl_pairs_are_mismatched() -> None:
    tok, *_, examples, _ = _examples(None, with_kl=True)
    for i, ex in enumerate(examples):
        nxt = examples[(i + 1) % len(examples)]
        assert ex.kl_ids == nxt.chosen_ids[: 96 - len(ex.prompt_ids)]
    batch = PairCollator(tok.pad_token_id)(examples[:2], [0, 1], with_kl=True)
    assert batch.kl_input_ids is not None and batch.kl_input_ids.shape[0] == 2
    assert torch.equal(batch.kl_attention_mask.sum(1), torch.tensor([len(e.prompt_ids) + len(e.kl_ids) for e in examples[:2]]))
