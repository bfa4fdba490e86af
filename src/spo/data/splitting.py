"""Deterministic train / eval / test assignment that never puts one prompt group in two splits.

Whole groups move together (HH: the opening question; TL;DR: the Reddit post), so a model is
never evaluated on a prompt it was trained on, not even a near-copy sharing the first turn.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence

from spo.config import SplitConfig


def unit_interval(salt: str, key: str) -> float:
    """A uniform number in [0, 1) from a hash: stable across machines, Python versions and runs."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(groups: Sequence[str], source_splits: Sequence[str], cfg: SplitConfig) -> list[str]:
    """One split name per row.

    ``source`` mode keeps the data set's own test split as test and carves eval out of train;
    a group that the source put in both train and test goes wholly to test, so that the
    published test split is never shrunk by a leak.
    """
    if cfg.mode == "hash":
        out = []
        for group in groups:
            u = unit_interval(cfg.salt, group)
            out.append("test" if u < cfg.test_fraction
                       else "eval" if u < cfg.test_fraction + cfg.eval_fraction
                       else "train")
        return out
    seen_in: dict[str, set[str]] = defaultdict(set)
    for group, source in zip(groups, source_splits):
        seen_in[group].add(source)
    out = []
    for group, source in zip(groups, source_splits):
        if source == "test" or "test" in seen_in[group]:
            out.append("test")
        else:
            out.append("eval" if unit_interval(cfg.salt, group) < cfg.eval_fraction else "train")
    return out
