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


@dataclass(frozen=True)
class NotJudged:
    """A request the judge gave up on, and why: the stage records it, counts it and carries on.

    ``budget`` marks the ones the budget stopped (the user's own limit) apart from the ones that
    failed (retries exhausted, or the endpoint refused that one request).
    """

    reason: str  # short, for grouping: "HTTP 429", "timed out", "refused: HTTP 400", "budget", ...
    detail: str  # the full message (key-free)
    attempts: int = 0  # HTTP calls made for it
    budget: bool = False


@runtime_checkable
class Judge(Protocol):
    judge_id: str  # for the cache key and outputs (e.g. "openai:gpt-4o@<base_url host>")

    def judge_many(self, requests: Sequence[JudgeRequest], progress: bool = True) -> list[Verdict | NotJudged]:
        """Same order as requests; a :class:`NotJudged` where the judge gave up on a request (budget
        spent, retries exhausted): the others are still judged, and partial results are kept."""
        ...
