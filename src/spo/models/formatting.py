"""How a data row becomes model text — one definition shared by SFT, preference training and
generation, so the policy is always trained and sampled on the same layout.

* With a chat template (the ``tiny`` tokenizer, instruct models): the prompt becomes chat
  messages rendered with ``add_generation_prompt=True``; HH dialogues become alternating
  user/assistant turns, a TL;DR post is one user message.  A response is ``response.strip()``
  followed by the template's end-of-turn text (``<|eos|>`` for tiny, ``<|im_end|>\\n`` for
  ChatML, ``<|eot_id|>`` for Llama 3 ...), read off the template itself.
* Without one (plain base models): the raw prompt text as it is in the data, and the response
  as it is followed by the eos token.

Token ids: concatenate ``format_prompt(...) + format_response(...)`` (or encode them
separately and join the ids) with ``add_special_tokens=add_special_tokens(tokenizer)``: a chat
template already writes bos, the raw layout lets the tokenizer add it.

``response_offset`` says how many leading characters of the raw response the formatting
dropped, so a character span ``(s, e)`` of the raw response is ``(s - off, e - off)`` in the
formatted one (spans inside the dropped whitespace clamp to 0).

Prompt truncation (:func:`encode_prompt`, the one place every stage truncates a prompt): a
prompt that fits ``max_prompt_length`` is exactly ``tokenizer(format_prompt(...),
add_special_tokens=add_special_tokens(tokenizer))``; a longer one keeps the chat template's
head (bos, a default system prompt, the first role header) and its tail (the generation
prompt) and loses dialogue content from the left, oldest first.  The raw layout keeps the
tokenizer's own bos and the last tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}
_PROBE = "\x00SPO-RESPONSE\x00"


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def add_special_tokens(tokenizer: Any) -> bool:
    """``add_special_tokens`` to use when encoding formatted text (False when the template writes them)."""
    return not has_chat_template(tokenizer)


def hh_messages(prompt: str) -> list[dict[str, str]]:
    """Split an HH prompt ("\\n\\nHuman: …\\n\\nAssistant: …\\n\\nAssistant:") into chat messages.

    Turn texts are stripped; the final empty assistant marker is dropped; consecutive turns of
    the same speaker are merged (chat templates expect alternation); text before the first
    marker, if any, joins the first user turn.
    """
    parts = _TURN.split(prompt)
    messages: list[dict[str, str]] = []
    preamble = parts[0].strip()
    if preamble:
        messages.append({"role": "user", "content": preamble})
    for speaker, text in zip(parts[1::2], parts[2::2]):
        role, content = _ROLE[speaker], text.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = "\n\n".join(c for c in (messages[-1]["content"], content) if c)
        else:
            messages.append({"role": role, "content": content})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def prompt_messages(prompt: str, source: str) -> list[dict[str, str]]:
    if source == "hh":
        return hh_messages(prompt)
    if source == "tldr":
        return [{"role": "user", "content": prompt.strip()}]
    raise ValueError(f"unknown source {source!r} (expected 'hh' or 'tldr')")


def format_prompt(tokenizer: Any, prompt: str, source: str) -> str:
    """The prompt as the model sees it, ending where the response starts."""
    if not has_chat_template(tokenizer):
        return prompt
    return tokenizer.apply_chat_template(
        prompt_messages(prompt, source), add_generation_prompt=True, tokenize=False
    )


def end_of_turn(tokenizer: Any) -> str:
    """The text a chat template writes after an assistant message (the eos token as fallback)."""
    eos = tokenizer.eos_token or ""
    if not has_chat_template(tokenizer):
        return eos
    user = [{"role": "user", "content": "hi"}]
    try:
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": _PROBE}], add_generation_prompt=False, tokenize=False
        )
    except Exception:  # noqa: BLE001 - a template that cannot render the probe: fall back to eos
        return eos
    if _PROBE not in full:
        return eos
    return full.split(_PROBE, 1)[1] or eos


def format_body(tokenizer: Any, response: str) -> str:
    """The part of :func:`format_response` that comes from the response itself.

    Chat template: the response stripped. Raw layout: :func:`spo.degrees.normalise` (stripped,
    one leading space kept: an HH reply follows "Assistant:" after a space). Either way it is
    the normalisation the degree variants get, so level 0 and its variants can never be told
    apart by leading or trailing whitespace.
    """
    if not has_chat_template(tokenizer):
        from spo.degrees import normalise

        return normalise(response)
    return response.strip()


def format_response(tokenizer: Any, response: str) -> str:
    """The response as the model is trained to write it, end-of-turn marker included."""
    if not has_chat_template(tokenizer):
        return format_body(tokenizer, response) + (tokenizer.eos_token or "")
    return format_body(tokenizer, response) + end_of_turn(tokenizer)


def response_offset(response: str, tokenizer: Any) -> int:
    """How many leading characters of ``response`` ``format_response`` dropped (the raw layout keeps
    one leading space: its body character i is the response's character i + offset, i >= 1)."""
    lead = len(response) - len(response.lstrip())
    if not has_chat_template(tokenizer) and response.startswith(" ") and response.strip():
        return lead - 1
    return lead


def body_strip(tokenizer: Any, text: str, origins: list[int]) -> tuple[str, list[int]]:
    """A level rendered by :func:`spo.degrees.render_with_origins` (already normalised) as
    :func:`format_body` writes it, with the per-character origins cut alike."""
    if not has_chat_template(tokenizer):
        return text, origins
    start = len(text) - len(text.lstrip())
    body = text.strip()
    return body, origins[start: start + len(body)]


@dataclass(frozen=True)
class PromptIds:
    """The token ids of one formatted prompt, as :func:`encode_prompt` returns them.

    ``ids``: at most ``max_prompt_length`` ids; ``truncated``: whether content was cut;
    ``full_length``: the token count of the whole formatted prompt (``len(ids)`` when not cut).
    """

    ids: list[int]
    truncated: bool
    full_length: int


def bos_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer itself puts in front of text (its bos), or [] when it adds none.

    Always [] with a chat template (the template writes bos; formatted text is encoded with
    ``add_special_tokens=False``).
    """
    if not add_special_tokens(tokenizer):
        return []
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    if len(full) > len(plain) and full[-len(plain):] == plain:
        return list(full[: len(full) - len(plain)])
    return []


def _content_probe(k: int) -> str:
    return f"\x00SPO-CONTENT-{k}\x00"


def content_spans(tokenizer: Any, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of each message's content in ``text``, the prompt the
    chat template rendered from ``messages`` (with the generation prompt).

    The template is rendered once more with a unique probe in place of each content; the text
    between the probes is the template's own (head, separators, tail), and ``text`` must be
    that skeleton with the contents put back.  A template that rewrites contents (beyond what
    is already stripped) falls back to finding each content in order after the head; if even
    that fails, an ``InputError`` says so.
    """
    from spo.errors import InputError

    probes = [{**m, "content": _content_probe(k)} for k, m in enumerate(messages)]
    skeleton = tokenizer.apply_chat_template(probes, add_generation_prompt=True, tokenize=False)
    segments: list[str] = []
    pos = 0
    for k in range(len(messages)):
        at = skeleton.find(_content_probe(k), pos)
        if at < 0:
            raise InputError(f"chat template drops message {k} of a prompt; cannot locate its content to truncate it")
        segments.append(skeleton[pos:at])
        pos = at + len(_content_probe(k))
    segments.append(skeleton[pos:])

    spans: list[tuple[int, int]] = []
    cursor, exact = 0, True
    for k, message in enumerate(messages):
        content = message["content"]
        if not text.startswith(segments[k], cursor) or not text.startswith(content, cursor + len(segments[k])):
            exact = False
            break
        cursor += len(segments[k])
        spans.append((cursor, cursor + len(content)))
        cursor += len(content)
    if exact and text[cursor:] == segments[-1]:
        return spans

    head, tail = segments[0], segments[-1]
    if not text.startswith(head) or not text.endswith(tail) or len(head) + len(tail) > len(text):
        raise InputError("chat template renders the prompt differently from its skeleton; "
                         "cannot locate the template head/tail to truncate it")
    spans, cursor, limit = [], len(head), len(text) - len(tail)
    for k, message in enumerate(messages):
        at = text.find(message["content"], cursor, limit)
        if at < 0:
            raise InputError(f"chat template rewrites the content of message {k}; "
                             "cannot locate it to truncate the prompt")
        spans.append((at, at + len(message["content"])))
        cursor = at + len(message["content"])
    return spans


def _next_content_start(spans: list[tuple[int, int]], char: int) -> int | None:
    """``char`` if it lies inside a content span, else the start of the next non-empty content
    (None when there is none): a cut never starts inside template text between contents."""
    for start, end in spans:
        if start <= char < end:
            return char
        if start >= char and end > start:
            return start
    return None


def _too_long(max_prompt_length: int, n_head: int, n_tail: int) -> Exception:
    from spo.errors import InputError

    return InputError(
        f"max_prompt_length {max_prompt_length} cannot hold the chat template's head ({n_head} tokens: "
        f"bos, system prompt, first role header) and tail ({n_tail} tokens: the generation prompt) "
        f"of a prompt; raise max_prompt_length above {n_head + n_tail}"
    )


def _cut_with_offsets(
    ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]], max_prompt_length: int
) -> list[int]:
    """Head + the longest suffix of the content tokens that fits + tail, sliced out of the
    one tokenisation of the whole prompt."""
    head_end, tail_start_char = spans[0][0], spans[-1][1]
    n_head = 0
    while n_head < len(ids) and offsets[n_head][0] < head_end:
        n_head += 1
    tail_start = len(ids)
    while tail_start > n_head and offsets[tail_start - 1][1] > tail_start_char:
        tail_start -= 1
    n_tail = len(ids) - tail_start
    budget = max_prompt_length - n_head - n_tail
    if budget < 0:
        raise _too_long(max_prompt_length, n_head, n_tail)
    cut = max(tail_start - budget, n_head)
    if cut < tail_start:
        char = _next_content_start(spans, offsets[cut][0])
        if char is None:
            cut = tail_start
        else:
            while cut < tail_start and offsets[cut][0] < char:
                cut += 1
    return ids[:n_head] + ids[cut:tail_start] + ids[tail_start:]


def _cut_by_retokenizing(
    encode: Callable[[str], list[int]], text: str, spans: list[tuple[int, int]], max_prompt_length: int
) -> list[int]:
    """The slow path (no offset mappings): head, tail and a suffix of the content text are
    encoded apart; the suffix start is found by bisection over characters."""
    head_end, tail_start = spans[0][0], spans[-1][1]
    head, tail = encode(text[:head_end]), encode(text[tail_start:])
    budget = max_prompt_length - len(head) - len(tail)
    if budget < 0:
        raise _too_long(max_prompt_length, len(head), len(tail))

    def body(char: int) -> list[int]:
        start = _next_content_start(spans, char)
        return [] if start is None or start >= tail_start else encode(text[start:tail_start])

    lo, hi = head_end, tail_start  # the smallest start whose body fits (token counts shrink with it)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(body(mid)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    kept = body(lo)
    while len(kept) > budget:  # counts need not be strictly monotone: step on until it fits
        lo += 1
        kept = body(lo)
    return head + kept + tail


def encode_prompt(tokenizer: Any, prompt: str, source: str, max_prompt_length: int) -> PromptIds:
    """The token ids of ``format_prompt(tokenizer, prompt, source)``, at most ``max_prompt_length``.

    A prompt that fits is ``tokenizer(format_prompt(...), add_special_tokens=add_special_tokens(
    tokenizer))["input_ids"]`` unchanged.  A longer one is cut:

    * chat template: the template's head (everything before the first message's content: bos,
      a system prompt the template inserts, the first role header) and tail (everything after
      the last content: end of turn + generation prompt) are kept whole; dialogue content is cut
      from the left, so whole early turns go first and the last turns (what the reply answers)
      stay.  A cut that would fall in template text between two contents (a role header) moves
      on to the next content's start.  The kept ids are slices of the single tokenisation of
      the whole prompt (fast tokenizers, offset mappings); a slow tokenizer encodes head, tail
      and the kept content apart instead.  ``InputError`` (naming the head/tail token counts)
      when head + tail alone exceed ``max_prompt_length``.
    * raw layout: the tokenizer's own bos (:func:`bos_prefix`) is kept, then the last tokens.
    """
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be at least 1, got {max_prompt_length}")
    if not has_chat_template(tokenizer):
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if len(ids) <= max_prompt_length:
            return PromptIds(ids, False, len(ids))
        bos = bos_prefix(tokenizer)
        keep = bos if bos and len(bos) < max_prompt_length and ids[: len(bos)] == bos else []
        return PromptIds(keep + ids[len(ids) - (max_prompt_length - len(keep)):], True, len(ids))

    messages = prompt_messages(prompt, source)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast)
    ids = list(enc["input_ids"])
    if len(ids) <= max_prompt_length:
        return PromptIds(ids, False, len(ids))
    if not messages:  # nothing but template text
        raise _too_long(max_prompt_length, len(ids), 0)
    spans = content_spans(tokenizer, messages, text)
    if fast:
        cut = _cut_with_offsets(ids, [tuple(o) for o in enc["offset_mapping"]], spans, max_prompt_length)
    else:
        cut = _cut_by_retokenizing(
            lambda t: list(tokenizer(t, add_special_tokens=False)["input_ids"]), text, spans, max_prompt_length
        )
    return PromptIds(cut, True, len(ids))


class EncodedExample(NamedTuple):
    prompt_ids: list[int]
    response_ids: list[int]
    prompt_truncated: bool
    response_truncated: bool


def encode_example(
    tokenizer: Any, prompt: str, response: str, source: str, *, max_prompt_length: int, max_length: int
) -> EncodedExample:
    """``(prompt_ids, response_ids, prompt_truncated, response_truncated)`` of a formatted row:
    the prompt is cut by :func:`encode_prompt` (template head and tail kept, dialogue content
    cut from the left), then the response is cut so that prompt + response fit ``max_length``."""
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length {max_prompt_length} must be below max_length {max_length}")
    prompt_enc = encode_prompt(tokenizer, prompt, source, max_prompt_length)
    response_ids = tokenizer(format_response(tokenizer, response), add_special_tokens=False)["input_ids"]
    budget = max_length - len(prompt_enc.ids)
    return EncodedExample(prompt_enc.ids, list(response_ids[:budget]), prompt_enc.truncated, len(response_ids) > budget)
