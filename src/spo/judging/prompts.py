"""Versioned judge prompts (DPO-paper convention, Rafailov et al. 2023, appendix D.3) and the verdict parser.

Templates live in ``prompts/<version>/<task>.txt`` and use ``{prompt}``, ``{response_a}`` and
``{response_b}`` placeholders, filled by plain substitution (never ``str.format``, so braces in a
conversation cannot break rendering).  A published version is never edited: a change of wording is
a new version, because the version is part of the judge cache key.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

from spo.judging.base import TASKS, JudgeRequest

# The line that carries the verdict, per task.
VERDICT_LABELS = {"dialogue": "More helpful", "summarization": "Preferred"}
_PLACEHOLDERS = ("{prompt}", "{response_a}", "{response_b}")


def available_versions() -> list[str]:
    root = resources.files("spo.judging") / "prompts"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


@cache
def load_template(version: str, task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown judge task {task!r}; expected one of {TASKS}")
    path = resources.files("spo.judging") / "prompts" / version / f"{task}.txt"
    if not path.is_file():
        raise ValueError(f"no judge prompt {version}/{task}.txt (versions: {available_versions()})")
    text = path.read_text(encoding="utf-8")
    missing = [p for p in _PLACEHOLDERS if p not in text]
    if missing:
        raise ValueError(f"judge prompt {version}/{task}.txt lacks {missing}")
    return text


def render(version: str, request: JudgeRequest) -> str:
    """The judge prompt for ``request``; single-pass substitution so a response containing
    ``{response_b}`` is left as is."""
    template = load_template(version, request.task)
    values = {"{prompt}": request.prompt.strip(), "{response_a}": request.response_a.strip(),
              "{response_b}": request.response_b.strip()}
    return re.sub(r"\{prompt\}|\{response_a\}|\{response_b\}", lambda m: values[m.group(0)], template)


_DECOR = "*_`#>\"'“”‘’«»()[]<> \t"


def _clean_choice(value: str) -> str | None:
    value = value.strip().strip(_DECOR).rstrip(".!,;:").strip(_DECOR)
    upper = value.upper()
    if upper in ("A", "B"):
        return upper
    m = re.fullmatch(r"(?:RESPONSE|SUMMARY|OPTION)\s+([AB])", upper)
    return m.group(1) if m else None


def parse_verdict(task: str, text: str) -> tuple[str | None, str | None]:
    """(winner, explanation) from the judge's text; winner is None when no clean verdict line exists.

    Accepts case changes, quotes, trailing punctuation and markdown bold around the label or the
    letter (``**More helpful:** "A".``).  The last verdict line wins; anything else (no line, an
    answer like "A and B", "neither") is None.
    """
    if task not in VERDICT_LABELS:
        raise ValueError(f"unknown judge task {task!r}; expected one of {TASKS}")
    label = VERDICT_LABELS[task]
    winner: str | None = None
    explanation: str | None = None
    line_re = re.compile(r"^[\s*_#>`-]*" + re.escape(label) + r"[\s*_`]*:[\s*_`]*(.*)$", re.IGNORECASE)
    expl_re = re.compile(r"^[\s*_#>`-]*comparison[\s*_`]*:[\s*_`]*(.*)$", re.IGNORECASE)
    for line in (text or "").splitlines():
        m = line_re.match(line)
        if m:
            winner = _clean_choice(m.group(1))
            continue
        e = expl_re.match(line)
        if e and explanation is None:
            explanation = e.group(1).strip().strip("*_ ").strip() or None
    return winner, explanation
