"""Turn one raw row of a source data set into the normalised pair every later stage reads.

A parser returns either a normalised row or a list of reasons the row cannot be used; it
never raises for bad content, so the caller can quarantine the row and go on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


@dataclass
class Problem:
    """Why a raw row could not be normalised, naming the field at fault."""

    field: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "reason": self.reason}


@dataclass
class Parsed:
    prompt: str = ""
    chosen: str = ""
    rejected: str = ""
    group: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def row_id(source: str, prompt: str, chosen: str, rejected: str) -> str:
    """Content hash: the same pair gets the same id on every machine and every run."""
    digest = hashlib.sha256()
    for part in (source, prompt, chosen, rejected):
        encoded = part.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()[:20]


def group_key(text: str) -> str:
    return hashlib.sha256(" ".join(text.lower().split()).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _require_str(raw: dict[str, Any], name: str, problems: list[Problem]) -> str | None:
    if name not in raw:
        problems.append(Problem(name, "missing field"))
        return None
    value = raw[name]
    if value is None:
        problems.append(Problem(name, "is null"))
        return None
    if not isinstance(value, str):
        problems.append(Problem(name, f"must be a string, got {type(value).__name__}"))
        return None
    return value


def split_final_turn(dialogue: str) -> tuple[str, str] | None:
    """Prompt up to and including the last Assistant marker, and the final response.

    The response keeps its leading space, as in the DPO reference implementation, so that
    prompt + response reproduces the original dialogue byte for byte.
    """
    cut = dialogue.rfind(ASSISTANT)
    if cut < 0:
        return None
    end = cut + len(ASSISTANT)
    return dialogue[:end], dialogue[end:]


def first_human_turn(dialogue: str) -> str:
    """The opening question: the key the shared HH sample was split by, so we group by it too."""
    start = dialogue.find(HUMAN)
    start = 0 if start < 0 else start + len(HUMAN)
    stop = dialogue.find(ASSISTANT, start)
    return dialogue[start : stop if stop >= 0 else len(dialogue)].strip()


def parse_hh(raw: dict[str, Any], keep_divergent: bool) -> Parsed:
    """HH-RLHF: two full dialogues that should differ only in the final Assistant turn."""
    out = Parsed()
    chosen = _require_str(raw, "chosen", out.problems)
    rejected = _require_str(raw, "rejected", out.problems)
    if chosen is None or rejected is None:
        return out
    chosen_split = split_final_turn(chosen)
    rejected_split = split_final_turn(rejected)
    if chosen_split is None:
        out.problems.append(Problem("chosen", "no '\\n\\nAssistant:' turn in the dialogue"))
    if rejected_split is None:
        out.problems.append(Problem("rejected", "no '\\n\\nAssistant:' turn in the dialogue"))
    if chosen_split is None or rejected_split is None:
        return out
    (out.prompt, out.chosen), (rejected_prompt, out.rejected) = chosen_split, rejected_split
    if rejected_prompt != out.prompt:
        common = 0
        limit = min(len(out.prompt), len(rejected_prompt))
        while common < limit and out.prompt[common] == rejected_prompt[common]:
            common += 1
        if not keep_divergent:
            out.problems.append(
                Problem(
                    "rejected",
                    f"dialogues diverge before the final Assistant turn (at character {common}); "
                    "the two responses answer different contexts",
                )
            )
            return out
        out.extra["divergence"] = {"at_char": common, "rejected_prompt": rejected_prompt}
    out.group = group_key(first_human_turn(chosen))
    return out


def parse_tldr(raw: dict[str, Any]) -> Parsed:
    """TL;DR comparisons: either our shared format (prompt/chosen/rejected present) or the
    original OpenAI record (info/summaries/choice), from which the pair is built."""
    out = Parsed()
    if "prompt" not in raw and "summaries" in raw:
        return _parse_tldr_original(raw)
    prompt = _require_str(raw, "prompt", out.problems)
    chosen = _require_str(raw, "chosen", out.problems)
    rejected = _require_str(raw, "rejected", out.problems)
    if prompt is None or chosen is None or rejected is None:
        return out
    out.prompt, out.chosen, out.rejected = prompt, chosen, rejected
    info = raw.get("info")
    post_id = info.get("id") if isinstance(info, dict) else None
    out.group = group_key(str(post_id)) if post_id else group_key(prompt)
    return out


def _parse_tldr_original(raw: dict[str, Any]) -> Parsed:
    out = Parsed()
    info, summaries, choice = raw.get("info"), raw.get("summaries"), raw.get("choice")
    if not isinstance(info, dict):
        out.problems.append(Problem("info", "must be an object with post, title, subreddit"))
    if not (isinstance(summaries, list) and len(summaries) == 2 and all(isinstance(s, dict) for s in summaries)):
        out.problems.append(Problem("summaries", "must be a list of two {text, ...} objects"))
    if not isinstance(choice, int) or choice not in (0, 1):  # 1.0 too: it cannot index the summaries
        out.problems.append(Problem("choice", f"must be 0 or 1, got {choice!r}"))
    # the isinstance tests repeat the checks above for the type checker: each already named a problem
    if out.problems or not isinstance(info, dict) or not isinstance(summaries, list) or not isinstance(choice, int):
        return out
    post = info.get("post") or ""
    title = info.get("title") or ""
    subreddit = info.get("subreddit") or ""
    out.prompt = f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
    texts = [s.get("text") for s in summaries]
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            out.problems.append(Problem(f"summaries[{index}].text", "must be a string"))
    if out.problems:
        return out
    out.chosen, out.rejected = texts[choice], texts[1 - choice]
    out.group = group_key(str(info.get("id") or out.prompt))
    return out


def parse(source: str, raw: dict[str, Any], keep_divergent: bool = False) -> Parsed:
    if source == "hh":
        return parse_hh(raw, keep_divergent)
    if source == "tldr":
        return parse_tldr(raw)
    raise ValueError(f"unknown source {source!r}; expected 'hh' or 'tldr'")
