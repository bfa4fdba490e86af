"""Tokenisation, degree variants at the token level, packing, batch order and input checks of spo.training.data."""

from __future__ import annotations

import pytest
import torch
from test_degrees import BUTTERFLIES, BUTTERFLY_PHRASES  # the method's worked example
from test_train_support import hh_pairs, tiny_model

from spo.degrees import build_degree_variants, words
from spo.errors import InputError
from spo.training.data import (
    PairCollator,
    attention_mask_4d,
    check_alignment,
    epoch_batches,
    kl_partners,
    sample_levels,
    tokenize_pairs,
)


def _examples(mode: str | None, max_length: int = 96, max_prompt_length: int = 48, rows=None, degs=None):
    if rows is None:
        rows, degs = hh_pairs()
    tok, _ = tiny_model()
    return tok, rows, degs, *tokenize_pairs(rows, degs, tok, max_length=max_length,
                                            max_prompt_length=max_prompt_length, degree_mode=mode)


def _butterfly_row(prompt: str = "\n\nHuman: Which butterflies live in Oregon?\n\nAssistant:") -> tuple[dict, dict]:
    row = {"id": "b", "source": "hh", "prompt": prompt, "chosen": BUTTERFLIES, "rejected": " I do not know."}
    line = {"id": "b", "n_levels": 4,
            "chosen": build_degree_variants(BUTTERFLIES, BUTTERFLY_PHRASES, 4).to_json(),
            "rejected": build_degree_variants(row["rejected"], ["know"], 4).to_json()}
    return row, line


def test_truncation_rules() -> None:
    tok, rows, _, examples, stats = _examples(None)
    assert stats.pairs == len(rows) and stats.prompts_truncated > 0 and stats.responses_truncated > 0
    for ex in examples:
        assert len(ex.prompt_ids) <= 48
        assert len(ex.prompt_ids) + len(ex.chosen_ids) <= 96 and len(ex.prompt_ids) + len(ex.rejected_ids) <= 96
        # a cut response ends in content, not in whitespace (as every degree variant does)
        for ids in (ex.chosen_ids, ex.rejected_ids):
            assert tok.decode(ids[-1:]).strip() or ids[-1] == tok.eos_token_id
    # the prompt keeps the template's head and its end: the generation prompt that the response follows
    assert all(tok.decode(ex.prompt_ids).startswith("<|bos|><|user|>") for ex in examples)
    assert tok.decode(examples[0].prompt_ids).endswith("<|assistant|>")


@pytest.mark.parametrize("max_length", [400, 90, 70, 60])
def test_reencode_levels_are_nested_cut_where_level0_is_and_share_its_end(max_length: int) -> None:
    """Defect 1: variants were built from the uncut response, so a truncated response's levels held
    text past level 0's cut and the end marker level 0 had lost."""
    rows, degs = hh_pairs()
    row, line = _butterfly_row()
    tok, *_, examples, stats = _examples("reencode", max_length, 40, [row, *rows], [line, *degs])
    eos = tok.eos_token_id
    checked = truncated = 0
    for ex in examples:
        for side, sd in ex.degrees.items():
            if not sd.distinct:
                continue
            level0 = ex.response(side)
            truncated += eos not in level0
            positions = [list(range(len(level0)))] + sd.variant_pos
            for k, (ids, pos) in enumerate(zip(sd.variant_ids, sd.variant_pos), start=1):
                assert len(ids) == len(pos) and pos == sorted(pos)
                assert set(pos) <= set(positions[k - 1]), (ex.id, side, k)  # nested: a subset of the level before
                assert max(pos) < len(level0)  # nothing past level 0's end
                assert (eos in ids) == (eos in level0)  # the end marker in all levels or none
                body = [t for t in ids if t != eos]
                assert len(body) <= len([t for t in level0 if t != eos])
                level0_words = words(tok.decode([t for t in level0 if t != eos]))
                assert _subsequence(words(tok.decode(body)), level0_words)  # no text level 0 does not have
                checked += 1
    assert checked > 50 and (truncated > 0) == (max_length < 400)
    if max_length < 400:
        assert stats.not_distinct_tokens > 0  # levels whose differences were all cut off are excluded


def _subsequence(small: list[str], big: list[str]) -> bool:
    """Up to a first letter raised to upper case: a word that removal made a sentence start
    (spo.degrees._capitalise_new_sentence_starts)."""
    it = iter(big)
    return all(any(x in (y, y[:1].upper() + y[1:]) for y in it) for x in small)


def test_kept_tokens_carry_their_own_original_position() -> None:
    """Defect 2: punctuation after a removal took the removed token's position."""
    row, line = _butterfly_row()
    tok, *_, examples, _ = _examples("reencode", 400, 60, [row], [line])
    ex = examples[0]
    sd = ex.degrees["chosen"]
    orig = ex.chosen_ids
    for ids, pos in zip(sd.variant_ids, sd.variant_pos):
        for token, p in zip(ids, pos):
            text = tok.decode([token]).strip()
            if text:  # a kept token and the original token at its position start with the same character
                assert text[0] in tok.decode([orig[p]]), (tok.decode([token]), tok.decode([orig[p]]))
    # level 3 removes "red admirals": its final "." is the original's final ".", not the removed word's token
    level3_ids, level3_pos = sd.variant_ids[2], sd.variant_pos[2]
    dot = max(i for i, t in enumerate(level3_ids) if tok.decode([t]).strip() == ".")
    assert tok.decode([orig[level3_pos[dot]]]).strip() == "."
    assert level3_pos[dot] == max(i for i, t in enumerate(orig) if tok.decode([t]).strip() == ".")


def test_drop_masks_nested_and_identical_masks_excluded() -> None:
    tok, rows, degs, examples, stats = _examples("drop")
    for ex in examples:
        for side, sd in ex.degrees.items():
            if not sd.distinct:
                assert sd.keep == []
                continue
            assert all(sd.keep[0]) and len(sd.keep[0]) == len(ex.response(side))
            for k in range(1, sd.n_levels):
                assert all(b <= a for a, b in zip(sd.keep[k - 1], sd.keep[k]))  # level k+1 drops more
            assert len({tuple(m) for m in sd.keep}) == sd.n_levels  # every level its own mask
    # cut so short that the later levels' removals are all past the cut: their masks coincide
    _, _, _, _, short = _examples("drop", 52, 40)
    assert short.not_distinct_tokens > stats.not_distinct_tokens


def test_packed_rows_segments_and_degree_samples() -> None:
    tok, *_, examples, _ = _examples("reencode")
    collate = PairCollator(tok.pad_token_id, "reencode", levels_per_step=None)
    idx = [i for i, ex in enumerate(examples) if all(sd.distinct for sd in ex.degrees.values())][:2]
    batch = collate([examples[i] for i in idx], idx)
    flat_ids, flat_seg, flat_ctx = batch.input_ids.view(-1), batch.segment_ids.view(-1), batch.context_ids.view(-1)
    width = batch.input_ids.shape[1]
    for j, i in enumerate(idx):
        ex = examples[i]
        first = int(batch.score_index[batch.score_seq == j][0]) - len(ex.prompt_ids) + 1  # the pair's first column
        row, col = divmod(first, width)
        prompt_seg = int(batch.segment_ids[row, col])
        mine = (batch.segment_ids[row] >= 0) & (batch.context_ids[row] == prompt_seg)
        assert int(mine.sum()) == ex.length  # every token of the pair's run, and nothing else
        # prompt, chosen, rejected, 3+3 variants
        assert len(set(batch.segment_ids[row][mine].tolist())) == 1 + 2 + 3 + 3
        variants = [v for side in ("chosen", "rejected") for v in ex.degrees[side].variant_ids]
        assert batch.input_ids[row][mine].tolist() == (ex.prompt_ids + ex.chosen_ids + ex.rejected_ids
                                                       + [t for v in variants for t in v])
        n_p = len(ex.prompt_ids)
        positions = batch.position_ids[row][mine].tolist()
        assert positions[:n_p] == list(range(n_p))  # every segment restarts where the prompt ends
        assert positions[n_p: n_p + len(ex.chosen_ids)] == list(range(n_p, n_p + len(ex.chosen_ids)))
    assert flat_ids.numel() == flat_seg.numel() == flat_ctx.numel()
    # scored tokens: chosen then rejected of each pair, each predicted by the previous position of its segment
    flat = batch.input_ids.view(-1)
    assert torch.equal(batch.score_counts(), torch.tensor([len(examples[i].chosen_ids) for i in idx]
                                                          + [len(examples[i].rejected_ids) for i in idx]))
    first = examples[idx[0]]
    assert flat[batch.score_index[0]] == first.prompt_ids[-1] and batch.score_target[0] == first.chosen_ids[0]
    assert torch.equal(flat[batch.score_index[1:len(first.chosen_ids)] + 1],
                       batch.score_target[1:len(first.chosen_ids)])
    # degree samples: 4 levels x 2 sides x 2 pairs; level 0 reads the alignment segment
    assert batch.deg_label.numel() == 16
    level0 = (batch.deg_label == 0).nonzero(as_tuple=True)[0]
    for m in level0.tolist():  # level 0 reads its pair's own chosen or rejected segment
        tokens = batch.deg_index[batch.deg_sample == m]
        segments = set(flat_seg[tokens].tolist())
        assert len(segments) == 1 and (flat_ctx[tokens] != flat_seg[tokens]).all()
    sampled = PairCollator(tok.pad_token_id, "reencode", levels_per_step=2)([examples[i] for i in idx], idx, step=3)
    assert sampled.deg_label.numel() == 8 and (sampled.deg_label == 0).sum() == 4
    assert sample_levels(4, 2, 0, 3, 7, "chosen") == sample_levels(4, 2, 0, 3, 7, "chosen")
    alignment = collate([examples[i] for i in idx], idx, degrees=False)
    assert alignment.n_tokens == sum(len(examples[i].prompt_ids) + len(examples[i].chosen_ids)
                                     + len(examples[i].rejected_ids) for i in idx)  # no variant


def test_attention_mask_sees_its_own_prompt_and_segment_only() -> None:
    # one row, two pairs: prompt 0 with responses 1, 2; prompt 3 with response 4; then padding
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 4, -1]])
    ctx = torch.tensor([[0, 0, 0, 0, 0, 0, 3, 3, -1]])
    mask = attention_mask_4d(seg, ctx)[0, 0]
    row = lambda *on: [i in on for i in range(9)]  # noqa: E731
    assert mask[3].tolist() == row(0, 1, 2, 3)  # chosen: its prompt + itself, causal
    assert mask[5].tolist() == row(0, 1, 4, 5)  # rejected does not see chosen
    assert mask[1].tolist() == row(0, 1)
    assert mask[6].tolist() == row(6) and mask[7].tolist() == row(6, 7)  # the second pair sees nothing of the first
    assert mask[8].tolist() == row(8)  # padding: only itself (no NaN row)
    additive = attention_mask_4d(seg, ctx, torch.float32)[0, 0]
    assert (additive[mask] == 0).all() and (additive[~mask] == torch.finfo(torch.float32).min).all()


def test_short_pairs_share_a_row() -> None:
    tok, *_, examples, _ = _examples(None, max_length=400, max_prompt_length=300)
    by_length = sorted(range(len(examples)), key=lambda i: examples[i].length)
    idx = [by_length[-1], *by_length[:7]]  # one long pair and the seven shortest
    batch = PairCollator(tok.pad_token_id)([examples[i] for i in idx], idx)
    lengths = sorted((examples[i].length for i in idx), reverse=True)
    assert batch.input_ids.shape[1] == lengths[0]  # no row longer than the longest pair
    assert batch.input_ids.shape[0] < 8 and batch.n_tokens == sum(lengths)  # fewer rows, every token once


def test_epoch_batches_deterministic_and_complete() -> None:
    lengths = list(range(50))
    a = epoch_batches(lengths, 8, seed=1, epoch=0, group_by_length=True)
    assert a == epoch_batches(lengths, 8, seed=1, epoch=0, group_by_length=True)
    assert a != epoch_batches(lengths, 8, seed=1, epoch=1, group_by_length=True)
    flat = [i for b in a for i in b]
    assert len(a) == 6 and len(set(flat)) == 48
    plain = epoch_batches(lengths, 8, seed=1, epoch=0, group_by_length=False)
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


def test_kl_rows_pair_each_prompt_with_the_next_response_of_its_batch() -> None:
    """Defect 7: z0 came from the next pair in data order, not from mismatched pairs of the batch."""
    tok, *_, examples, _ = _examples(None)
    batch = [5, 2, 9]
    partners = kl_partners(batch)
    assert partners == {5: 2, 2: 9, 9: 5} and all(partners[i] != i for i in batch)
    kl = PairCollator(tok.pad_token_id).kl([examples[i] for i in batch], [examples[partners[i]] for i in batch],
                                           batch, 96)
    # issue 22: both responses of the partner, as TRL's KTO shifts every completion (not the chosen alone)
    assert kl.n_scored == 6
    for j, i in enumerate(batch):
        ex, other = examples[i], examples[partners[i]]
        for seq, response in ((j, other.chosen_ids), (3 + j, other.rejected_ids)):
            assert kl.score_target[kl.score_seq == seq].tolist() == response[: 96 - len(ex.prompt_ids)]
            assert kl.input_ids.view(-1)[kl.score_index[kl.score_seq == seq][0]] == ex.prompt_ids[-1]
