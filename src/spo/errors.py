"""Exceptions shared by the stages and the CLI (kept here so stages need not import ``spo.cli``)."""

from __future__ import annotations


class StageFailed(RuntimeError):
    """A stage ran but its result is not acceptable (e.g. too many quarantined rows).

    The stage writes all its outputs (reports, quarantine) before raising, so the user can
    inspect what went wrong; the CLI turns this into a non-zero exit.
    """
