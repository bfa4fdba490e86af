"""Preference pairs as token ids, and the packed micro-batches the trainer runs.

Tokenisation, once before training — one :class:`PairExample` per (prompt, chosen, rejected):

* prompt: :func:`spo.models.formatting.encode_prompt` — a chat template's head (bos, system
  prompt, first role header) and its generation prompt are always kept; a long prompt loses
  dialogue content from the left;
* responses: the ids of ``format_response`` (end-of-turn marker included), cut at the right so
  that prompt + response <= ``max_length``. A cut response also loses trailing whitespace-only
  tokens, so it ends in content, as every degree variant does.

Degree variants, only when the SPO loss is on, built from the response **as cut** (a level may
never hold text past level 0's end, nor an end marker level 0 lost):

* ``reencode``: level k >= 1 is re-rendered from the cut response with the level's removed
  spans clipped to the cut (:func:`spo.degrees.render_with_origins`, the same rendering and
  normalisation as the degrees stage), encoded, and followed by exactly the end-marker tokens
  level 0 kept. Each token carries its OWN position in the original response: the original
  token holding its first non-space character (characters the cleaning synthesised have no
  position and take the next token's). A position that the previous level does not have is
  moved to the next one it has, so each level's positions are a subset of the previous
  level's (nested, by construction).
* ``drop``: level k's mask over the cut original tokens: a token is dropped when its characters
  overlap a removed span of level k; the end marker is always kept.

A response whose levels are not all distinct — in the degree dataset, or as tokens once cut
(``not_distinct_tokens``) — is excluded from the degree loss and counted; the alignment loss
still uses it.

Packing, per micro-batch (:class:`PairCollator`): each pair is ONE run of tokens,
``[prompt | chosen | rejected | variants of chosen | variants of rejected]``, and whole pairs
are packed first-fit decreasing into rows no longer than the longest pair (short pairs share a
row instead of being padded to the longest). Each response segment attends to its pair's
prompt and to its own earlier tokens only (a 4-D mask built from ``segment_ids`` and
``context_ids``, :func:`attention_mask_4d`), and its position ids restart where its prompt
ends, so every segment is computed exactly as in a ``prompt + segment`` row of its own — but
the prompt is encoded once per pair instead of once per row, and there is no padding between
segments or pairs. Scored tokens (the alignment log-probs) and degree-feature tokens are
addressed by flat indices into the ``[rows x length]`` hidden states.
"""

from __future__ import annotations

import bisect
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spo.errors import InputError
from spo.io import check_aligned, read_jsonl

log = logging.getLogger("spo.train")

SIDES = ("chosen", "rejected")


# --------------------------------------------------------------------------------------------
# examples


@dataclass
class SideDegrees:
    """Degree data of one response (token level)."""

    n_levels: int
    distinct: bool
    # reencode: index k-1 holds level k (k >= 1): its ids and each token's original position
    variant_ids: list[list[int]] = field(default_factory=list)
    variant_pos: list[list[int]] = field(default_factory=list)
    # drop: index k holds level k's keep mask over the (cut) original response tokens
    keep: list[list[bool]] = field(default_factory=list)


@dataclass
class PairExample:
    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    degrees: dict[str, SideDegrees] = field(default_factory=dict)  # "chosen"/"rejected"; empty without SPO

    @property
    def length(self) -> int:
        """Tokens of the pair's packed row with every degree variant."""
        variants = sum(len(v) for sd in self.degrees.values() for v in sd.variant_ids)
        return self.alignment_length + variants

    @property
    def alignment_length(self) -> int:
        """Tokens of prompt + chosen + rejected: the length batches are grouped by.

        Never the packed length: the degree variants exist only when the SPO loss is on, and
        grouping by them would give a DPO+SPO policy other batches than its DPO twin (an audit
        found the two arms sharing 145 of 320 pairs and no batch), so that every difference
        between the arms would mix SPO with a different data sample.
        """
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    def response(self, side: str) -> list[int]:
        return self.chosen_ids if side == "chosen" else self.rejected_ids


@dataclass
class TokenizeStats:
    pairs: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    dropped_empty: int = 0
    not_distinct: int = 0  # responses whose levels are not distinct in the degree dataset
    not_distinct_tokens: int = 0  # distinct as text, not as tokens once cut to max_length

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    @property
    def excluded(self) -> int:
        return self.not_distinct + self.not_distinct_tokens


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


def check_alignment(rows_path: Path | str, rows: Sequence[dict], degrees_path: Path | str,
                    degrees: Sequence[dict]) -> None:
    check_aligned(rows_path, list(rows), degrees_path, list(degrees), "degree", " (rebuild with `spo degrees`)")
    levels = {d.get("n_levels") for d in degrees}
    if len(levels) > 1:
        raise InputError(f"{degrees_path}: lines disagree on n_levels ({sorted(map(str, levels))})")


# --------------------------------------------------------------------------------------------
# one response, encoded


@dataclass
class _Encoded:
    """``format_response(raw)`` as tokens, with what maps them back to the raw response."""

    text: str  # the formatted response
    ids: list[int]
    starts: list[int]  # token start characters in the formatted text
    ends: list[int]
    offset: int  # leading raw characters format_response dropped
    body_len: int  # formatted characters that come from the raw response (the rest is the end marker)

    def kept(self, budget: int) -> int:
        """How many tokens a cut to ``budget`` keeps: trailing whitespace-only body tokens go too."""
        n = min(len(self.ids), budget)
        if n < len(self.ids):
            while (n > 1 and self.starts[n - 1] < self.body_len
                   and self.text[self.starts[n - 1]: self.ends[n - 1]].isspace()):
                n -= 1
        return n

    def body_tokens(self, n: int) -> int:
        """How many of the first ``n`` tokens carry response text (the rest is the end marker)."""
        return sum(1 for s in self.starts[:n] if s < self.body_len)

    def token_at(self, fmt_char: int) -> int:
        return max(0, bisect.bisect_right(self.starts, fmt_char) - 1)


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[int], list[int]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    return list(enc["input_ids"]), [s for s, _ in offsets], [e for _, e in offsets]


def _encode_response(tokenizer: Any, response: str) -> _Encoded:
    from spo.models.formatting import format_body, format_response, response_offset

    text = format_response(tokenizer, response)
    ids, starts, ends = _encode(tokenizer, text)
    return _Encoded(text, ids, starts, ends, response_offset(response, tokenizer),
                    len(format_body(tokenizer, response)))


def _clip(spans: Sequence[Sequence[int]], cut: int) -> list[tuple[int, int]]:
    return [(int(s), min(int(e), cut)) for s, e in spans if int(s) < cut]


def _reencode_levels(tokenizer: Any, raw: str, enc: _Encoded, n_keep: int, entry: dict, where: str,
                     ) -> tuple[list[list[int]], list[list[int]]]:
    """Ids and original positions of levels 1.. of a response cut to its first ``n_keep`` tokens.

    An uncut response's levels must re-render to the degree dataset's own texts: anything else
    means the dataset was built from other responses or by another version (InputError).
    """
    from spo.degrees import render_with_origins
    from spo.models.formatting import body_strip

    n_body = enc.body_tokens(n_keep)
    n_variants = len(entry["removed_spans"]) - 1
    if n_body == 0:  # nothing of the response fits: every level is the same (and excluded)
        return [enc.ids[:n_keep]] * n_variants, [list(range(n_keep))] * n_variants
    marker = enc.ids[n_body:n_keep]  # the end-marker tokens level 0 kept (all, some or none)
    marker_pos = list(range(n_body, n_keep))
    cut = min(enc.ends[n_body - 1], enc.body_len) + enc.offset  # in raw characters
    whole = cut >= enc.body_len + enc.offset
    allowed = list(range(n_keep))  # level 0's positions
    all_ids: list[list[int]] = []
    all_pos: list[list[int]] = []
    for k, spans in enumerate(entry["removed_spans"][1:], start=1):
        text, origins = render_with_origins(raw[:cut], _clip(spans, cut))
        if whole and text != entry["levels"][k]:
            raise InputError(f"{where}: levels[{k}] is not what its removed_spans give for this row's response "
                             "(the degree dataset was built from other rows or by another version: rebuild it with "
                             "`spo degrees`)")
        text, origins = body_strip(tokenizer, text, origins)
        ids, starts, ends = _encode(tokenizer, text)
        ids, starts, ends = ids[:n_body], starts[:n_body], ends[:n_body]
        pos = _own_positions(text, origins, starts, ends, enc)
        pos = _nested(pos, allowed)
        all_ids.append(ids + marker)
        all_pos.append(pos + marker_pos)
        allowed = sorted(set(all_pos[-1]))
    return all_ids, all_pos


def _own_positions(text: str, origins: list[int], starts: list[int], ends: list[int], enc: _Encoded) -> list[int]:
    """Per token, the original token holding its first non-space character (see the module doc)."""
    out: list[int | None] = []
    for s, e in zip(starts, ends):
        found = None
        for i in range(s, e):
            if origins[i] >= 0 and not text[i].isspace():
                found = origins[i]
                break
        if found is None:
            found = next((origins[i] for i in range(s, e) if origins[i] >= 0), None)
        out.append(None if found is None else enc.token_at(found - enc.offset))
    nxt = out[-1] if out and out[-1] is not None else None
    for i in range(len(out) - 1, -1, -1):  # synthesised-only tokens take the next token's position
        if out[i] is None:
            out[i] = nxt if nxt is not None else 0
        nxt = out[i]
    return [int(p) for p in out]  # type: ignore[arg-type]


def _nested(positions: list[int], allowed: list[int]) -> list[int]:
    """Each position, or the next one ``allowed`` (sorted) holds — the last when there is none."""
    out = []
    for p in positions:
        i = bisect.bisect_left(allowed, p)
        out.append(allowed[min(i, len(allowed) - 1)])
    return out


def _keep_masks(enc: _Encoded, n_keep: int, removed: Sequence[Sequence[Sequence[int]]]) -> list[list[bool]]:
    masks = []
    for spans in removed:
        fmt = sorted((int(s) - enc.offset, int(e) - enc.offset) for s, e in spans)
        starts = [s for s, _ in fmt]
        keep = []
        for s, e in zip(enc.starts[:n_keep], enc.ends[:n_keep]):
            e = min(e, enc.body_len)
            if s >= e:  # the end marker (outside the raw text) always survives
                keep.append(True)
                continue
            i = bisect.bisect_left(starts, e) - 1  # spans are disjoint and sorted: the last starting before e
            keep.append(not (i >= 0 and fmt[i][1] > s))
        masks.append(keep)
    return masks


def _side_degrees(tokenizer: Any, raw: str, enc: _Encoded, n_keep: int, entry: dict, n_levels: int, mode: str,
                  stats: TokenizeStats, where: str) -> SideDegrees:
    sd = SideDegrees(n_levels=n_levels, distinct=bool(entry["distinct"]))
    if not sd.distinct:
        stats.not_distinct += 1
        return sd
    removed = entry["removed_spans"]
    levels: Sequence[Sequence[int]]  # token ids per level (reencode), or keep masks (bools)
    if mode == "reencode":
        sd.variant_ids, sd.variant_pos = _reencode_levels(tokenizer, raw, enc, n_keep, entry, where)
        levels = [enc.ids[:n_keep], *sd.variant_ids]
    else:
        sd.keep = _keep_masks(enc, n_keep, removed)
        levels = sd.keep
    if len({tuple(level) for level in levels}) < n_levels:
        stats.not_distinct_tokens += 1
        return SideDegrees(n_levels=n_levels, distinct=False)
    return sd


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
    where: str = "rows",
) -> tuple[list[PairExample], TokenizeStats]:
    """Tokenise rows (and degree lines when ``degree_mode`` is "reencode"/"drop").

    Pairs with an empty response after truncation, or whose two responses are the same tokens,
    carry no preference signal: they are dropped and counted (a WARNING says how many).
    """
    from spo.models.formatting import encode_prompt

    if max_prompt_length >= max_length:
        raise InputError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})")
    if degree_mode is not None and degrees is None:
        raise InputError(f"{where}: the degree loss is on but no degree dataset was given")
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("training needs a fast tokenizer (offset mappings)")
    stats = TokenizeStats()
    examples: list[PairExample] = []
    for line, row in enumerate(rows, start=1):
        prompt = encode_prompt(tokenizer, row["prompt"], row.get("source", "hh"), max_prompt_length)
        stats.prompts_truncated += prompt.truncated
        budget = max_length - len(prompt.ids)
        encoded: dict[str, _Encoded] = {}
        kept: dict[str, int] = {}
        for side in SIDES:
            enc = _encode_response(tokenizer, row[side])
            encoded[side], kept[side] = enc, enc.kept(budget)
            stats.responses_truncated += kept[side] < len(enc.ids)
        ids = {side: encoded[side].ids[: kept[side]] for side in SIDES}
        if not ids["chosen"] or not ids["rejected"] or ids["chosen"] == ids["rejected"]:
            stats.dropped_empty += 1
            continue
        ex = PairExample(str(row.get("id", line)), prompt.ids, ids["chosen"], ids["rejected"])
        if degree_mode is not None:
            deg = degrees[line - 1]  # type: ignore[index]
            n = int(deg["n_levels"])
            for side in SIDES:
                ex.degrees[side] = _side_degrees(tokenizer, row[side], encoded[side], kept[side], deg[side], n,
                                                 degree_mode, stats, f"{where}:{line}: degree {side}")
        examples.append(ex)
    stats.pairs = len(examples)
    if stats.prompts_truncated or stats.responses_truncated:
        log.info(
            "%s: %d prompts cut to %d tokens (template head kept, oldest dialogue content dropped), "
            "%d responses cut to fit max_length %d",
            where, stats.prompts_truncated, max_prompt_length, stats.responses_truncated, max_length,
        )
    if stats.not_distinct_tokens:
        log.info("%s: %d responses excluded from the degree loss because their levels are no longer distinct "
                 "once cut to max_length", where, stats.not_distinct_tokens)
    if stats.dropped_empty:
        log.warning("%s: %d pairs dropped (a response empty after truncation, or both responses the same tokens)",
                    where, stats.dropped_empty)
    if not examples:
        raise InputError(f"{where}: no usable pair left after tokenisation and filtering ({len(rows)} rows read)")
    return examples, stats


# --------------------------------------------------------------------------------------------
# batch order


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool) -> list[list[int]]:
    """The global batches (lists of example indices) of one epoch; deterministic for (seed, epoch).

    The incomplete last batch is dropped (every process must run the same number of steps).
    ``group_by_length``: the shuffled order is cut into mega-chunks of 32 global batches, each
    sorted by length (so a micro-batch holds similar lengths), then the batches are shuffled.
    ``lengths`` must not depend on the loss options (:attr:`PairExample.alignment_length`), so
    that every policy of a comparison gets the same batches.
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


def kl_partners(batch: Sequence[int]) -> dict[int, int]:
    """KTO's mismatched pairs: each pair of a batch is matched with the next pair's response (cyclic).

    A batch of one pair has no mismatched pair; the config check refuses KTO with batch_size 1.
    """
    return {i: batch[(j + 1) % len(batch)] for j, i in enumerate(batch)}


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
# packing


@dataclass
class PackedBatch:
    """One micro-batch, packed (see the module docstring).

    ``segment_ids``: a row's segments (each pair's prompt and responses), -1 padding;
    ``context_ids``: the segment a token may see besides its own (its pair's prompt). ``score_*`` address
    the tokens whose log-probs are summed into the ``n_scored`` sequences (chosen 0..b-1, then
    rejected b..2b-1; or the b KL responses): ``score_index`` is the flat ``row * length + pos``
    of the hidden state that PREDICTS the token (the previous position of its segment, the last
    prompt token for the first one), ``score_target`` the token id, ``score_seq`` its sequence.
    ``deg_*`` describe the degree classifier's inputs: ``deg_index`` (flat, as above) of every
    feature token, ``deg_sample`` its sample (0..M-1) and ``deg_pos`` its own position in the
    original response; per sample its level ``deg_label`` and side ``deg_side`` (0 chosen).
    """

    input_ids: Tensor
    position_ids: Tensor
    segment_ids: Tensor
    context_ids: Tensor
    score_index: Tensor
    score_target: Tensor
    score_seq: Tensor
    n_scored: int
    n_pairs: int
    indices: list[int]
    deg_index: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    deg_sample: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    deg_pos: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    deg_label: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    deg_side: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    deg_pair: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # per sample: its pair's index
    excluded: list[int] = field(default_factory=lambda: [0, 0])  # [chosen, rejected] responses without degree loss
    levels_sampled: bool = False  # levels_per_step drew some levels (level 0 always): the labels are not balanced

    def to(self, device: torch.device) -> PackedBatch:
        for name, value in list(self.__dict__.items()):
            if isinstance(value, Tensor):
                setattr(self, name, value.to(device, non_blocking=True))
        return self

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens in the forward."""
        return int((self.segment_ids >= 0).sum())

    def score_counts(self) -> Tensor:
        """Scored tokens per sequence [n_scored] (response lengths)."""
        return torch.bincount(self.score_seq, minlength=self.n_scored)


def may_attend(q_seg: Tensor, k_seg: Tensor, q_ctx: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """The packed batch's attention rule, on broadcastable tensors: query ``q`` (of segment
    ``q_seg``, context ``q_ctx``) sees key ``k`` (of segment ``k_seg``) up to itself when the key
    is in its own segment or its context (a response: its pair's prompt; a prompt: itself);
    padding sees only itself (a query with no key would make sdpa return NaN).

    One rule for both masks: the dense one of :func:`attention_mask_4d` and flex attention's
    ``mask_mod`` (:func:`spo.training.forward.block_mask`), so the two paths cannot drift apart."""
    allowed = (k <= q) & ((k_seg == q_seg) | (k_seg == q_ctx)) & (k_seg >= 0) & (q_seg >= 0)
    return allowed | ((q == k) & (q_seg < 0))


def attention_mask_4d(segment_ids: Tensor, context_ids: Tensor, float_dtype: torch.dtype | None = None) -> Tensor:
    """[R, L] -> [R, 1, L, L] mask of a packed batch (:func:`may_attend`). Boolean (True: attend)
    for sdpa; with ``float_dtype``, additive (0 / dtype min) as eager attention wants."""
    seg, ctx = segment_ids, context_ids
    positions = torch.arange(seg.shape[1], device=seg.device)
    allowed = may_attend(seg[:, :, None], seg[:, None, :], ctx[:, :, None], positions[:, None], positions[None, :])
    allowed = allowed[:, None]
    if float_dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=float_dtype, device=seg.device).masked_fill(
        ~allowed, torch.finfo(float_dtype).min)


@dataclass
class _Placed:
    """Where one pair landed: its row, the column of its last prompt token, each segment's first column."""

    row: int
    last_prompt: int
    starts: list[int]


def _pack(pairs: list[tuple[list[int], list[list[int]]]], pad_id: int, multiple: int | None
          ) -> tuple[Tensor, Tensor, Tensor, Tensor, int, list[_Placed]]:
    """Pack (prompt, segments) pairs into rows, first-fit decreasing: a row holds whole pairs up to
    the longest pair's length, so short pairs share a row instead of being padded to the longest.

    Returns input ids, position ids (each segment restarts where its prompt ends), segment ids
    (unique within a row; -1 padding), context ids (the prompt a token may also see) [R, L], the
    width and each pair's placement.
    """
    lengths = [len(p) + sum(len(x) for x in segs) for p, segs in pairs]
    capacity = max(lengths)
    free: list[int] = []  # room left per row
    row_of = [0] * len(pairs)
    for j in sorted(range(len(pairs)), key=lambda j: -lengths[j]):
        row = next((r for r, room in enumerate(free) if room >= lengths[j]), None)
        if row is None:
            free.append(capacity)
            row = len(free) - 1
        free[row] -= lengths[j]
        row_of[j] = row
    ids: list[list[int]] = [[] for _ in free]
    pos: list[list[int]] = [[] for _ in free]
    seg: list[list[int]] = [[] for _ in free]
    ctx: list[list[int]] = [[] for _ in free]
    next_seg = [0] * len(free)
    placed = []
    for j, (prompt, segments) in enumerate(pairs):
        r = row_of[j]
        prompt_seg = next_seg[r]
        next_seg[r] += 1 + len(segments)
        ids[r] += prompt
        pos[r] += range(len(prompt))
        seg[r] += [prompt_seg] * len(prompt)
        ctx[r] += [prompt_seg] * len(prompt)
        last_prompt = len(ids[r]) - 1
        starts = []
        for k, segment in enumerate(segments, start=1):
            starts.append(len(ids[r]))
            ids[r] += segment
            pos[r] += range(len(prompt), len(prompt) + len(segment))
            seg[r] += [prompt_seg + k] * len(segment)
            ctx[r] += [prompt_seg] * len(segment)
        placed.append(_Placed(r, last_prompt, starts))
    width = max(len(r) for r in ids)
    if multiple:
        width = -(-width // multiple) * multiple
    shape = (len(ids), width)
    tensors = [torch.full(shape, fill, dtype=torch.long) for fill in (pad_id, 0, -1, -1)]
    for r in range(len(ids)):
        for t, values in zip(tensors, (ids[r], pos[r], seg[r], ctx[r])):
            t[r, : len(values)] = torch.tensor(values, dtype=torch.long)
    return (*tensors, width, placed)  # type: ignore[return-value]


@dataclass(frozen=True)
class _Segment:
    """One response segment of a pass: an alignment response (``level`` None, scored) or a variant."""

    pair: int  # index in the micro-batch
    side: int  # 0 chosen, 1 rejected
    level: int | None = None


class PairCollator:
    """Packs examples into :class:`PackedBatch` passes (pairs whole, first-fit decreasing into rows).

    ``degree_mode`` None: no degree samples. ``levels_per_step``/``seed``/``step`` pick the
    sampled levels (see :func:`sample_levels`); ``all_levels=True`` (eval) uses every level.
    ``separate_variants``: the reencode variants are left out of the alignment pass; the trainer
    asks for them with :meth:`variant_passes` (``train.spo.variant_passes: separate``).
    """

    def __init__(self, pad_token_id: int, degree_mode: str | None = None, levels_per_step: int | None = None,
                 seed: int = 0, pad_to_multiple_of: int | None = None, separate_variants: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.degree_mode = degree_mode
        self.levels_per_step = levels_per_step
        self.seed = seed
        self.pad_to_multiple_of = pad_to_multiple_of
        self.separate_variants = separate_variants and degree_mode == "reencode"

    def _levels(self, examples: Sequence[PairExample], indices: Sequence[int], step: int,
                all_levels: bool) -> list[list[list[int] | None]]:
        """Per pair and side, the sampled levels, or None: excluded from the degree loss."""
        m = None if all_levels else self.levels_per_step
        out: list[list[list[int] | None]] = []
        for ex, idx in zip(examples, indices):
            sides: list[list[int] | None] = []
            for side in SIDES:
                sd = ex.degrees.get(side)
                ok = self.degree_mode is not None and sd is not None and sd.distinct
                sides.append(sample_levels(sd.n_levels, m, self.seed, step, idx, side) if ok else None)  # type: ignore[union-attr]
            out.append(sides)
        return out

    def __call__(self, examples: Sequence[PairExample], indices: Sequence[int], step: int = 0,
                 all_levels: bool = False, degrees: bool = True) -> PackedBatch:
        """The alignment pass: ``[prompt | chosen | rejected (| variants)]`` per pair, with every degree
        sample it can hold; ``degrees=False``: alignment segments only (a reference forward)."""
        levels: list[list[list[int] | None]] = (self._levels(examples, indices, step, all_levels) if degrees
                                                 else [[None, None] for _ in examples])
        # eval keeps the variants in the pass: without gradients there is no graph to bound
        with_variants = self.degree_mode == "reencode" and (all_levels or not self.separate_variants)
        segments = []
        for j in range(len(examples)):
            mine = [_Segment(j, 0), _Segment(j, 1)]
            if with_variants:
                mine += [_Segment(j, s, k) for s in range(2) for k in levels[j][s] or [] if k > 0]
            segments.append(mine)
        batch = self._build(examples, indices, segments, levels)
        batch.excluded = ([sum(lv[s] is None for lv in levels) for s in range(2)] if degrees and self.degree_mode
                          else [0, 0])
        batch.levels_sampled = degrees and not all_levels and self.levels_per_step is not None
        return batch

    def variant_passes(self, examples: Sequence[PairExample], indices: Sequence[int], step: int,
                       budget: int) -> list[PackedBatch]:
        """The reencode variants left out of the alignment pass, in passes of at most ``budget``
        tokens each (prompt copies included; a pass holds one segment at least)."""
        levels = self._levels(examples, indices, step, False)
        passes: list[list[list[_Segment]]] = []
        current: list[list[_Segment]] = [[] for _ in examples]
        used = 0
        for j, ex in enumerate(examples):
            for s, side in enumerate(SIDES):
                for k in levels[j][s] or []:
                    if k == 0:
                        continue
                    cost = len(ex.degrees[side].variant_ids[k - 1]) + (0 if current[j] else len(ex.prompt_ids))
                    if used and used + cost > budget:
                        passes.append(current)
                        current, used = [[] for _ in examples], 0
                        cost = len(ex.degrees[side].variant_ids[k - 1]) + len(ex.prompt_ids)
                    current[j].append(_Segment(j, s, k))
                    used += cost
        if used:
            passes.append(current)
        built = [self._build(examples, indices, segs, levels) for segs in passes]
        for batch in built:
            batch.levels_sampled = self.levels_per_step is not None
        return built

    def _build(self, examples: Sequence[PairExample], indices: Sequence[int], segments: list[list[_Segment]],
               levels: list[list[list[int] | None]]) -> PackedBatch:
        """Pack the pairs that have segments; scored tokens from the alignment segments, degree
        samples for every (pair, side, level) whose features this pass holds."""
        b = len(examples)
        present = [j for j in range(b) if segments[j]]

        def ids(seg: _Segment) -> list[int]:
            ex = examples[seg.pair]
            if seg.level is None:
                return ex.response(SIDES[seg.side])
            return ex.degrees[SIDES[seg.side]].variant_ids[seg.level - 1]

        input_ids, position_ids, segment_ids, context_ids, width, placed = _pack(
            [(examples[j].prompt_ids, [ids(seg) for seg in segments[j]]) for j in present],
            self.pad_token_id, self.pad_to_multiple_of)
        where: dict[_Segment, tuple[int, int, int]] = {}  # segment -> (row, last prompt column, first column)
        for p, j in enumerate(present):
            for seg, start in zip(segments[j], placed[p].starts):
                where[seg] = (placed[p].row, placed[p].last_prompt, start)
        scored = [(seg.side * b + seg.pair, *where[seg], ids(seg)) for s in range(2) for j in present
                  for seg in segments[j] if seg.level is None and seg.side == s]
        batch = _scored_batch(input_ids, position_ids, segment_ids, context_ids, width, scored,
                              2 * b if scored else 0, list(indices))
        # (row, columns, positions, label, side, pair)
        samples: list[tuple[int, list[int], list[int], int, int, int]] = []
        for s, side in enumerate(SIDES):
            for j in present:
                sd = examples[j].degrees.get(side)
                for k in levels[j][s] or []:
                    source = _Segment(j, s, None if (k == 0 or self.degree_mode == "drop") else k)
                    if source not in where:
                        continue
                    row, _, start = where[source]
                    n = len(ids(source))
                    if self.degree_mode == "drop":
                        pos = [t for t in range(n) if sd.keep[k][t]]  # type: ignore[union-attr]
                    else:
                        pos = list(range(n)) if k == 0 else sd.variant_pos[k - 1]  # type: ignore[union-attr]
                    cols = [start + t for t in range(n)] if self.degree_mode == "reencode" else [start + t for t in pos]
                    samples.append((row, cols, pos, k, s, indices[j]))
        if samples:
            batch.deg_index = torch.tensor([r * width + c for r, cols, *_ in samples for c in cols], dtype=torch.long)
            batch.deg_sample = torch.tensor([m for m, (_, cols, *_) in enumerate(samples) for _ in cols],
                                            dtype=torch.long)
            batch.deg_pos = torch.tensor([p for _, _, pos, *_ in samples for p in pos], dtype=torch.long)
            batch.deg_label = torch.tensor([smp[3] for smp in samples], dtype=torch.long)
            batch.deg_side = torch.tensor([smp[4] for smp in samples], dtype=torch.long)
            batch.deg_pair = torch.tensor([smp[5] for smp in samples], dtype=torch.long)
        return batch

    def kl(self, examples: Sequence[PairExample], partners: Sequence[PairExample], indices: Sequence[int],
           max_length: int) -> PackedBatch:
        """KTO's mismatched rows: prompt i + each response of its partner (chosen, then rejected),
        cut to ``max_length``; scored sequences ``[chosen of partners..., rejected of partners...]``.

        Both responses, as TRL's KTO shifts every completion (desirable and undesirable) against
        the prompts: z0 estimates the KL on what the policy is trained on, not on the chosen
        responses alone."""
        b = len(examples)
        responses = [[ids[: max_length - len(ex.prompt_ids)] for ids in (other.chosen_ids, other.rejected_ids)]
                     for ex, other in zip(examples, partners)]
        input_ids, position_ids, segment_ids, context_ids, width, placed = _pack(
            [(ex.prompt_ids, pair) for ex, pair in zip(examples, responses)], self.pad_token_id,
            self.pad_to_multiple_of)
        scored = [(side * b + j, placed[j].row, placed[j].last_prompt, placed[j].starts[side], pair[side])
                  for side in range(2) for j, pair in enumerate(responses)]
        return _scored_batch(input_ids, position_ids, segment_ids, context_ids, width, scored, 2 * b, list(indices))


def _scored_batch(input_ids: Tensor, position_ids: Tensor, segment_ids: Tensor, context_ids: Tensor, width: int,
                  scored: list[tuple[int, int, int, int, list[int]]], n_scored: int, indices: list[int]) -> PackedBatch:
    """The batch with its scored tokens: (sequence, row, last prompt column, first column, ids) each."""
    index: list[int] = []
    target: list[int] = []
    seq: list[int] = []
    for s, row, last_prompt, start, ids in scored:
        base = row * width
        index.append(base + last_prompt)  # the last prompt token predicts the first response token
        index.extend(base + start + t for t in range(len(ids) - 1))
        target.extend(ids)
        seq.extend([s] * len(ids))
    return PackedBatch(
        input_ids=input_ids, position_ids=position_ids, segment_ids=segment_ids, context_ids=context_ids,
        score_index=torch.tensor(index, dtype=torch.long), score_target=torch.tensor(target, dtype=torch.long),
        score_seq=torch.tensor(seq, dtype=torch.long), n_scored=n_scored, n_pairs=len(indices), indices=indices,
    )
