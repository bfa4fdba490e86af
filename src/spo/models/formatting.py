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
"""

from __future__ import annotations

import re
from typing import Any

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


def format_response(tokenizer: Any, response: str) -> str:
    """The response as the model is trained to write it, end-of-turn marker included."""
    if not has_chat_template(tokenizer):
        return response + (tokenizer.eos_token or "")
    return response.strip() + end_of_turn(tokenizer)


def response_offset(response: str, tokenizer: Any) -> int:
    """How many leading characters of ``response`` ``format_response`` dropped."""
    if not has_chat_template(tokenizer):
        return 0
    return len(response) - len(response.lstrip())


def encode_example(
    tokenizer: Any, prompt: str, response: str, source: str, *, max_prompt_length: int, max_length: int
) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)`` of a formatted row, truncated as SFT and training do:
    the prompt keeps its last ``max_prompt_length`` tokens (cut from the left), then the
    response is cut so that prompt + response fit ``max_length``."""
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length {max_prompt_length} must be below max_length {max_length}")
    prompt_ids = tokenizer(format_prompt(tokenizer, prompt, source), add_special_tokens=add_special_tokens(tokenizer))["input_ids"]
    response_ids = tokenizer(format_response(tokenizer, response), add_special_tokens=False)["input_ids"]
    prompt_ids = prompt_ids[-max_prompt_length:]
    return prompt_ids, response_ids[: max_length - len(prompt_ids)]
