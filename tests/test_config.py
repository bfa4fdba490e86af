"""The config surface: params.yaml documents every knob, typos fail loudly, overrides parse."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO

from spo.config import ConfigError, SpoConfig, load_config


def _leaf_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and not dotted.endswith(("splits", "hub")):
            keys |= _leaf_keys(value, dotted + ".")
        else:
            keys.add(dotted)
    return keys


def test_params_yaml_lists_every_knob_with_its_default() -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = SpoConfig().model_dump(mode="json", by_alias=True)
    assert _leaf_keys(params) == _leaf_keys(defaults)
    assert load_config(REPO / "params.yaml") == SpoConfig()


def test_typo_is_rejected_with_its_path(tmp_path: Path) -> None:
    params = tmp_path / "p.yaml"
    params.write_text("keywords:\n  methd: yake\n")
    with pytest.raises(ConfigError, match="keywords.methd: Extra inputs are not permitted"):
        load_config(params)


def test_overrides_are_yaml_scalars() -> None:
    cfg = load_config(None, ["keywords.workers=1", "keywords.method=yake", "degrees.n_levels=6", "data.local_dir=null"])
    assert cfg.keywords.workers == 1 and cfg.keywords.method == "yake" and cfg.degrees.n_levels == 6
    with pytest.raises(ConfigError, match="degrees.n_levels"):
        load_config(None, ["degrees.n_levels=1"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["degrees.n_levels"])


def test_section_hash_changes_only_with_its_sections() -> None:
    base = load_config(None)
    other = load_config(None, ["keywords.method=yake"])
    assert base.section_hash("degrees") == other.section_hash("degrees")
    assert base.section_hash("keywords") != other.section_hash("keywords")
    assert base.section_hash("validate") == other.section_hash("validate")
