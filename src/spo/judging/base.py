"""The contract every judge implements (OpenAI-compatible LLM judge, local reward model)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

TASKS = ("dialogue", "summarization")


@dataclass(frozen=True)
class JudgeRequest:
    prompt: str  # the conversation / post the responses answer (raw text as in our rows)
    response_a: str  # shown first
    response_b: str  # shown second
    task: str  # "dialogue" | "summarization"


@dataclass
class Verdict:
    winner: str | None  # "A", "B", or None = invalid (unparseable twice)
    raw: str  # the judge's full text (all attempts joined with "\n---\n" if retried)
    explanation: str | None
    cached: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0


class BudgetExhausted(RuntimeError):
    """The call, token or cost budget is spent; no further API call may be made."""


@runtime_checkable
class Judge(Protocol):
    judge_id: str  # for the cache key and outputs (e.g. "openai:gpt-4o@<base_url host>")

    def judge_many(self, requests: Sequence[JudgeRequest], progress: bool = True) -> list[Verdict | None]:
        """Same order as requests; None = not judged because the budget stopped the run (partial results are kept)."""
        ...
