"""Every exception the project raises on purpose, in one module beneath all others.

One place to see what can go wrong and how the CLI treats it: an ``InputError`` (bad input,
naming the file, row and field) exits 2, a ``StageFailed`` (the stage ran, its result is not
acceptable) exits 1 after the stage wrote what explains it. Grouped by where they are raised;
this module imports nothing of the project, so any module may raise these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class StageFailed(RuntimeError):
    """A stage ran but its result is not acceptable (e.g. too many quarantined rows).

    The stage writes all its outputs (reports, quarantine) before raising, so the user can
    inspect what went wrong; the CLI turns this into a non-zero exit.
    """


class InputError(ValueError):
    """Bad input that stops a stage; the message names the file, line and field."""


class OutputError(StageFailed):
    """An output could not be written because the disk (or quota) is full: the message names the
    output and ENOSPC; nothing half-written is left in its place (the CLI prints it, exit 2)."""

    def __init__(self, message: str, code: str = "ENOSPC") -> None:
        super().__init__(message)
        self.code = code


class ConfigError(ValueError):
    """A params file or override that cannot be turned into an SpoConfig."""


class GpuUnavailableError(RuntimeError):
    """A task placed on GPUs cannot use them: stop before any work, not after hours on the CPU."""


class BudgetExhausted(RuntimeError):
    """The call, token or cost budget is spent; no further API call may be made."""


class JudgeConfigError(InputError):
    """The judge cannot be set up (e.g. the API key variable is unset): the CLI says so and exits 2."""


class JudgeAPIError(StageFailed):
    """The endpoint refuses every request (a 4xx such as 401, or an exhausted quota). Key-free message."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class JudgeCannotJudge(StageFailed):
    """Too many new requests ended without a verdict: the judge stopped before paying for the rest."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one manifest document.

    ``document`` identifies it as ``Kind/name (document N)`` (N counts from 1
    in input order), ``path`` is a JSON path such as ``$.spec.tags['a.b']``.
    """

    document: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.document}: {self.path}: {self.message}"


class ManifestValidationError(ValueError):
    """Raised by :func:`validate_manifests`; ``problems`` lists every finding.

    All problems are collected before raising so one run shows everything
    that needs fixing, not just the first mistake.
    """

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        count = len(self.problems)
        lines = "\n".join(f"  {problem}" for problem in self.problems)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} in manifests:\n{lines}")


class MissingCacheError(RuntimeError):
    """Recorded outputs whose data is in neither the view's DVC cache nor the remote: pushing would
    publish a dvc.lock that no ``dvc pull`` can satisfy. Names every missing file."""

    def __init__(self, message: str, missing: Sequence[str]) -> None:
        super().__init__(message)
        self.missing = list(missing)


class TrainJobError(RuntimeError):
    """A TrainJob did not complete; the message says what happened and how to look closer."""


class TrainJobFailed(TrainJobError):
    """The job's ``Failed`` condition: ``reason`` and ``message`` are the job's own."""

    def __init__(self, text: str, reason: str, message: str) -> None:
        super().__init__(text)
        self.reason, self.message = reason, message


class TrainJobTimeout(TrainJobError):
    """The launcher's deadline passed before the job finished; the job was deleted."""


class TrainJobApiError(TrainJobError):
    """The Kubernetes API refused or could not be reached; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, text: str, status: int) -> None:
        super().__init__(text)
        self.status = status


class WorkspaceNotWritable(RuntimeError):
    """A volume of the run (the checkpoint PVC, the workspace) does not let this task's user write:
    stop with what to change."""


class StoreError(StageFailed):
    """The Kubernetes API refused the resources, or a name is taken by something else."""


class SubmitError(StageFailed):
    """The KFP API refused a request or the run did not succeed (``spo`` then exits non-zero)."""


class NonFiniteLossError(StageFailed):
    """A non-finite loss or gradient with ``nan_policy: raise``."""


class CheckpointError(StageFailed):
    """``train.resume`` found checkpoints but none is usable; the message names each damaged file."""


class GridTooLarge(ConfigError):
    """A grid over one of ``grid``'s limits (cells, judge calls, the judge's estimated cost): refused
    before anything is trained or paid for, unless asked for on purpose."""
