"""Preference pairs as token ids: alignment sequences, SPO degree variants, batching.

One :class:`PairExample` per (prompt, chosen, rejected) row, tokenised once before training:

* prompt ids: ``format_prompt`` encoded without special tokens, with the tokenizer's own bos
  prepended when the layout lets the tokenizer add it (raw layout; a chat template writes bos
  itself, see ``spo.models.formatting``) — so bos is never added twice;
* response ids: ``format_response`` (end-of-turn marker included), never with special tokens;
* truncation: the prompt keeps its END (``max_prompt_length``; a leading bos is kept), then
  each response is cut at the right so prompt + response <= ``max_length``.

Degree variants per response (only when the SPO loss is active):

* ``reencode`` mode: for each level k >= 1 the ids of ``format_response(level_k)`` (cut to the
  same budget) and, per variant token, its position within the ORIGINAL response's tokens.
  The words of a level are a subsequence of the original's words (spo.degrees), so variant
  words are aligned greedily to original words; variant characters map to original characters,
  and those to original token indices through the offset mappings. Non-word characters map to
  the original character right after the previous aligned word.
* ``drop`` mode: per level k the mask of original response tokens that survive: a token is
  dropped when its character span overlaps a removed span of level k (spans are in the raw
  response's characters; ``response_offset`` shifts them into the formatted text). Tokens
  outside the raw text (the end-of-turn marker) always survive.

A response whose levels are not all distinct is flagged (``distinct=False``): the degree loss
skips it (counted as ``excluded``), the alignment loss uses it.
"""

from __future__ import annotations

import bisect
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spo.degrees import WORD_RE
from spo.io import InputError, check_aligned, read_jsonl

log = logging.getLogger("spo.train")

SIDES = ("chosen", "rejected")
IGNORE = -100


# --------------------------------------------------------------------------------------------
# examples


@dataclass
class SideDegrees:
    """Degree data of one response (token level)."""

    n_levels: int
    distinct: bool
    # reencode: index k-1 holds level k (k >= 1)
    variant_ids: list[list[int]] = field(default_factory=list)
    variant_pos: list[list[int]] = field(default_factory=list)
    # drop: index k holds level k's keep mask over the (truncated) original response tokens
    keep: list[list[bool]] = field(default_factory=list)


@dataclass
class PairExample:
    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    kl_ids: list[int] = field(default_factory=list)  # KTO: the next pair's chosen response, cut to fit
    degrees: dict[str, SideDegrees] = field(default_factory=dict)  # "chosen"/"rejected"; empty without SPO

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class TokenizeStats:
    pairs: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    variants_truncated: int = 0
    dropped_empty: int = 0
    not_distinct: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------------------------
# loading rows + degrees


def load_pairs(rows_path: str | Path, degrees_path: str | Path | None) -> tuple[list[dict], list[dict] | None]:
    """Rows and (optionally) their degree lines, checked to be aligned line by line by id."""
    rows_path = Path(rows_path)
    if not rows_path.is_file():
        raise InputError(f"{rows_path}: rows file not found (run `spo validate` first)")
    rows = read_jsonl(rows_path)
    if degrees_path is None:
        return rows, None
    degrees_path = Path(degrees_path)
    if not degrees_path.is_file():
        raise InputError(f"{degrees_path}: degree dataset not found for {rows_path} (run `spo degrees` first)")
    degrees = read_jsonl(degrees_path)
    check_alignment(rows_path, rows, degrees_path, degrees)
    return rows, degrees


def check_alignment(rows_path: Path | str, rows: Sequence[dict], degrees_path: Path | str, degrees: Sequence[dict]) -> None:
    check_aligned(rows_path, list(rows), degrees_path, list(degrees), "degree", " (rebuild with `spo degrees`)")
    levels = {d.get("n_levels") for d in degrees}
    if len(levels) > 1:
        raise InputError(f"{degrees_path}: lines disagree on n_levels ({sorted(map(str, levels))})")


# --------------------------------------------------------------------------------------------
# tokenisation helpers


def _bos_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer itself puts in front of text (its bos), or [] when it adds none."""
    from spo.models.formatting import add_special_tokens

    if not add_special_tokens(tokenizer):
        return []
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    if len(full) > len(plain) and full[-len(plain):] == plain:
        return list(full[: len(full) - len(plain)])
    return []


@dataclass
class _Encoded:
    ids: list[int]
    offsets: list[tuple[int, int]]  # in the formatted text
    offset: int  # leading raw characters format_response dropped
    body_len: int  # formatted characters that come from the raw response (the rest is the end marker)


def _encode_response(tokenizer: Any, response: str) -> _Encoded:
    from spo.models.formatting import format_response, response_offset

    text = format_response(tokenizer, response)
    off = response_offset(response, tokenizer)
    body = os.path.commonprefix([text, response[off:]])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return _Encoded(list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]], off, len(body))


def _token_at(starts: list[int], char: int) -> int:
    return max(0, bisect.bisect_right(starts, char) - 1)


def _variant_positions(orig: str, orig_enc: _Encoded, variant: str, var_enc: _Encoded) -> list[int]:
    """Per variant token, the index of the original response token it comes from."""
    o_words = [(m.start(), m.end(), m.group()) for m in WORD_RE.finditer(orig)]
    v_words = [(m.start(), m.end(), m.group()) for m in WORD_RE.finditer(variant)]
    aligned: list[tuple[int, int, int]] = []  # (v_start, v_end, o_start)
    j = 0
    for vs, ve, w in v_words:
        while j < len(o_words) and o_words[j][2] != w:
            j += 1
        if j == len(o_words):
            break  # not a subsequence (should not happen): the rest maps past the last word
        aligned.append((vs, ve, o_words[j][0]))
        j += 1
    v_starts = [a[0] for a in aligned]

    def raw_map(vc: int) -> int:
        i = bisect.bisect_right(v_starts, vc) - 1
        if i >= 0 and vc < aligned[i][1]:
            return aligned[i][2] + (vc - aligned[i][0])
        if i >= 0:  # after word i: the character after its original end
            vs, ve, os_ = aligned[i]
            return os_ + (ve - vs) + (vc - ve)
        return min(vc, aligned[0][2]) if aligned else vc

    o_starts = [s for s, _ in orig_enc.offsets]
    n_orig = len(orig_enc.ids)
    positions: list[int] = []
    last = 0
    for s, e in var_enc.offsets:
        if s >= var_enc.body_len:  # end-of-turn marker: same distance into the original's marker
            fmt_char = orig_enc.body_len + (s - var_enc.body_len)
        else:
            raw = s + var_enc.offset
            seg = variant[raw: e + var_enc.offset]
            m = WORD_RE.search(seg)
            if m:
                raw += m.start()
            fmt_char = raw_map(raw) - orig_enc.offset
        pos = min(max(_token_at(o_starts, fmt_char), last), max(n_orig - 1, 0))
        positions.append(pos)
        last = pos
    return positions


def _keep_mask(enc: _Encoded, spans: Sequence[Sequence[int]], n_tokens: int) -> list[bool]:
    spans = sorted((int(s) - enc.offset, int(e) - enc.offset) for s, e in spans)
    starts = [s for s, _ in spans]
    keep = []
    for s, e in enc.offsets[:n_tokens]:
        e = min(e, enc.body_len)
        if s >= e:
            keep.append(True)
            continue
        # spans are disjoint and sorted: check the last span starting before e
        i = bisect.bisect_left(starts, e) - 1
        keep.append(not (i >= 0 and spans[i][1] > s))
    return keep


# --------------------------------------------------------------------------------------------
# dataset


def tokenize_pairs(
    rows: Sequence[dict],
    degrees: Sequence[dict] | None,
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int,
    degree_mode: str | None = None,
    with_kl: bool = False,
    where: str = "rows",
) -> tuple[list[PairExample], TokenizeStats]:
    """Tokenise rows (and degree lines when ``degree_mode`` is "reencode"/"drop").

    Pairs with an empty response after truncation, or whose two responses are the same tokens,
    carry no preference signal: they are dropped and counted (a WARNING says how many).
    """
    from spo.models.formatting import format_prompt

    if max_prompt_length >= max_length:
        raise InputError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})")
    if degree_mode is not None and degrees is None:
        raise InputError(f"{where}: the degree loss is on but no degree dataset was given")
    if degree_mode is not None and not getattr(tokenizer, "is_fast", False):
        raise InputError("the degree loss needs a fast tokenizer (offset mappings)")
    bos = _bos_prefix(tokenizer)
    stats = TokenizeStats()
    examples: list[PairExample] = []
    for line, row in enumerate(rows, start=1):
        prompt_text = format_prompt(tokenizer, row["prompt"], row.get("source", "hh"))
        prompt_ids = bos + list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        if len(prompt_ids) > max_prompt_length:
            stats.prompts_truncated += 1
            keep_head = prompt_ids[: len(bos)] if bos and len(bos) < max_prompt_length else []
            prompt_ids = keep_head + prompt_ids[len(prompt_ids) - (max_prompt_length - len(keep_head)):]
        budget = max_length - len(prompt_ids)
        encoded: dict[str, _Encoded] = {}
        ids: dict[str, list[int]] = {}
        for side in SIDES:
            enc = _encode_response(tokenizer, row[side])
            encoded[side] = enc
            if len(enc.ids) > budget:
                stats.responses_truncated += 1
            ids[side] = enc.ids[:budget]
        if not ids["chosen"] or not ids["rejected"] or ids["chosen"] == ids["rejected"]:
            stats.dropped_empty += 1
            continue
        ex = PairExample(str(row.get("id", line)), prompt_ids, ids["chosen"], ids["rejected"])
        if degree_mode is not None:
            deg = degrees[line - 1]
            for side in SIDES:
                d = deg[side]
                n = int(deg["n_levels"])
                sd = SideDegrees(n_levels=n, distinct=bool(d["distinct"]))
                if not sd.distinct:
                    stats.not_distinct += 1
                elif degree_mode == "reencode":
                    orig = row[side]
                    for k in range(1, n):
                        venc = _encode_response(tokenizer, d["levels"][k])
                        if len(venc.ids) > budget:
                            stats.variants_truncated += 1
                        pos = _variant_positions(orig, encoded[side], d["levels"][k], venc)
                        sd.variant_ids.append(venc.ids[:budget])
                        sd.variant_pos.append(pos[:budget])
                else:
                    sd.keep = [_keep_mask(encoded[side], d["removed_spans"][k], len(ids[side])) for k in range(n)]
                ex.degrees[side] = sd
        examples.append(ex)
    if with_kl and examples:
        for i, ex in enumerate(examples):
            other = examples[(i + 1) % len(examples)]
            ex.kl_ids = other.chosen_ids[: max_length - len(ex.prompt_ids)]
    stats.pairs = len(examples)
    if stats.prompts_truncated or stats.responses_truncated:
        log.info(
            "%s: %d prompts cut to %d tokens (end kept), %d responses cut to fit max_length %d",
            where, stats.prompts_truncated, max_prompt_length, stats.responses_truncated, max_length,
        )
    if stats.dropped_empty:
        log.warning("%s: %d pairs dropped (a response empty after truncation, or both responses the same tokens)",
                    where, stats.dropped_empty)
    if not examples:
        raise InputError(f"{where}: no usable pair left after tokenisation and filtering ({len(rows)} rows read)")
    return examples, stats


# --------------------------------------------------------------------------------------------
# batch order


def epoch_batches(lengths: Sequence[int], batch_size: int, micro_batch_size: int, seed: int, epoch: int,
                  group_by_length: bool) -> list[list[int]]:
    """The global batches (lists of example indices) of one epoch; deterministic for (seed, epoch).

    The incomplete last batch is dropped (every process must run the same number of steps).
    ``group_by_length``: the shuffled order is cut into mega-chunks of 32 global batches, each
    sorted by length (so a micro-batch holds similar lengths), then the batches are shuffled.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    n_batches = len(order) // batch_size
    order = order[: n_batches * batch_size]
    if group_by_length and n_batches > 1:
        chunk = batch_size * 32
        grouped: list[int] = []
        for start in range(0, len(order), chunk):
            grouped.extend(sorted(order[start: start + chunk], key=lambda i: -lengths[i]))
        batches = [grouped[i: i + batch_size] for i in range(0, len(grouped), batch_size)]
        perm = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in perm]
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def sample_levels(n_levels: int, m: int | None, seed: int, step: int, index: int, side: str) -> list[int]:
    """The levels used for one response at one step: all, or level 0 + (m-1) drawn uniformly.

    Seeded by (seed, step, example index, side) with its own generator: independent of process
    layout and of the global torch RNG.
    """
    if m is None or m >= n_levels:
        return list(range(n_levels))
    rng = random.Random(f"{seed}/{step}/{index}/{side}")
    return [0, *sorted(rng.sample(range(1, n_levels), max(m - 1, 0)))]


# --------------------------------------------------------------------------------------------
# collation


@dataclass
class Batch:
    """One padded micro-batch. Rows: b chosen, b rejected, then the reencode variants.

    ``labels`` is -100 on prompt, padding and variant rows (only the 2b alignment rows have
    log-probs). ``deg_*`` describe the degree-classifier inputs: ``deg_row`` indexes rows of the
    forward, ``deg_mask``/``deg_pos`` select tokens and their original positions.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    n_pairs: int
    deg_row: torch.Tensor
    deg_mask: torch.Tensor
    deg_pos: torch.Tensor
    deg_label: torch.Tensor
    deg_side: torch.Tensor  # 0 chosen, 1 rejected
    excluded: list[int]  # [chosen, rejected] responses excluded from the degree loss
    indices: list[int]
    kl_input_ids: torch.Tensor | None = None
    kl_attention_mask: torch.Tensor | None = None
    kl_labels: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        for name, value in list(self.__dict__.items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def _pad(seqs: list[list[int]], value: int, width: int) -> torch.Tensor:
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


class PairCollator:
    """Pads a list of examples (right padding) into a :class:`Batch`.

    ``degree_mode`` None: no degree rows. ``levels_per_step``/``seed``/``step`` pick the sampled
    levels (see :func:`sample_levels`); ``all_levels=True`` (eval) uses every level.
    """

    def __init__(self, pad_token_id: int, degree_mode: str | None = None, levels_per_step: int | None = None,
                 seed: int = 0, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.degree_mode = degree_mode
        self.levels_per_step = levels_per_step
        self.seed = seed
        self.pad_to_multiple_of = pad_to_multiple_of

    def _width(self, lengths: list[int]) -> int:
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return width

    def __call__(self, examples: Sequence[PairExample], indices: Sequence[int], step: int = 0,
                 all_levels: bool = False, with_kl: bool = False) -> Batch:
        b = len(examples)
        seqs: list[list[int]] = []
        label_seqs: list[list[int]] = []
        prompt_lens: list[int] = []
        for side in SIDES:
            for ex in examples:
                resp = ex.chosen_ids if side == "chosen" else ex.rejected_ids
                seqs.append(ex.prompt_ids + resp)
                label_seqs.append([IGNORE] * len(ex.prompt_ids) + resp)
                prompt_lens.append(len(ex.prompt_ids))
        # degree rows: (row, mask start/end or keep list, positions, label, side)
        specs: list[tuple[int, int, list[bool] | None, list[int] | None, int, int]] = []
        excluded = [0, 0]
        if self.degree_mode is not None:
            m = None if all_levels else self.levels_per_step
            for s_i, side in enumerate(SIDES):
                for j, (ex, idx) in enumerate(zip(examples, indices)):
                    sd = ex.degrees.get(side)
                    if sd is None or not sd.distinct:
                        excluded[s_i] += 1
                        continue
                    row0 = s_i * b + j
                    resp_len = len(seqs[row0]) - len(ex.prompt_ids)
                    for k in sample_levels(sd.n_levels, m, self.seed, step, idx, side):
                        if self.degree_mode == "drop":
                            specs.append((row0, len(ex.prompt_ids), sd.keep[k], list(range(resp_len)), k, s_i))
                        elif k == 0:
                            specs.append((row0, len(ex.prompt_ids), None, list(range(resp_len)), 0, s_i))
                        else:
                            row = len(seqs)
                            seqs.append(ex.prompt_ids + sd.variant_ids[k - 1])
                            label_seqs.append([IGNORE] * len(seqs[-1]))
                            specs.append((row, len(ex.prompt_ids), None, sd.variant_pos[k - 1], k, s_i))
        width = self._width([len(s) for s in seqs])
        input_ids = _pad(seqs, self.pad_token_id, width)
        attention_mask = _pad([[1] * len(s) for s in seqs], 0, width)
        labels = _pad(label_seqs, IGNORE, width)
        M = len(specs)
        deg_mask = torch.zeros((M, width), dtype=torch.bool)
        deg_pos = torch.zeros((M, width), dtype=torch.long)
        for i, (row, start, keep, pos, _, _) in enumerate(specs):
            n = len(pos)
            if keep is None:
                deg_mask[i, start: start + n] = True
            else:
                deg_mask[i, start: start + n] = torch.tensor(keep[:n], dtype=torch.bool)
            deg_pos[i, start: start + n] = torch.tensor(pos, dtype=torch.long)
        batch = Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            n_pairs=b,
            deg_row=torch.tensor([s[0] for s in specs], dtype=torch.long),
            deg_mask=deg_mask,
            deg_pos=deg_pos,
            deg_label=torch.tensor([s[4] for s in specs], dtype=torch.long),
            deg_side=torch.tensor([s[5] for s in specs], dtype=torch.long),
            excluded=excluded,
            indices=list(indices),
        )
        if with_kl:
            kl_seqs = [ex.prompt_ids + ex.kl_ids for ex in examples]
            kl_labels = [[IGNORE] * len(ex.prompt_ids) + ex.kl_ids for ex in examples]
            w = self._width([len(s) for s in kl_seqs])
            batch.kl_input_ids = _pad(kl_seqs, self.pad_token_id, w)
            batch.kl_attention_mask = _pad([[1] * len(s) for s in kl_seqs], 0, w)
            batch.kl_labels = _pad(kl_labels, IGNORE, w)
        return batch
