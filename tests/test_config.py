"""The config surface: params.yaml documents every knob, typos fail loudly, overrides parse."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO

from spo.config import SpoConfig, load_config
from spo.errors import ConfigError


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


def test_train_seed_reseeds_the_training_alone() -> None:
    """A seed sweep sets train.seed: the data stages (which read the run's seed) stay as they are,
    so every seed trains on the same data; train.seed null falls back to the run's seed."""
    base = load_config(REPO / "params.yaml")
    assert base.train.seed is None and base.training_seed == base.seed
    swept = load_config(REPO / "params.yaml", ["train.seed=7"])
    assert swept.training_seed == 7 and swept.seed == base.seed
    for stage in ("prepare", "validate", "keywords", "degrees", "sft"):
        assert swept.section_hash(stage) == base.section_hash(stage), stage
    assert swept.section_hash("train") != base.section_hash("train")
    # the run's seed, by contrast, reaches every stage
    assert load_config(REPO / "params.yaml", ["seed=7"]).section_hash("prepare") != base.section_hash("prepare")


def test_twin_is_the_same_loss_without_spo() -> None:
    cfg = load_config(REPO / "params.yaml", ["variants.ipo_spo={loss: ipo, spo: true}",
                                             "variants.base={loss: ipo, spo: false}"])
    assert cfg.twin("dpo_spo") == "dpo" and cfg.twin("ipo_spo") == "base"
    assert cfg.twin("dpo") is None and cfg.twin("nope") is None


def test_generation_and_comparisons_follow_the_variants() -> None:
    cfg = load_config(REPO / "params.yaml", [  # adds to the params file's dpo and dpo_spo
        "variants.ipo={loss: ipo, spo: false}",
        "variants.ipo_spo={loss: ipo, spo: true}",
        "variants.kto_spo={loss: kto, spo: true}",
    ])
    assert cfg.generation_models() == {  # one policy per cell: params.yaml's grid.seeds is [0]
        "sft": "models/sft",
        **{f"{name}_s0": f"models/policy/{name}_s0" for name in ("dpo", "dpo_spo", "ipo", "ipo_spo", "kto_spo")},
    }
    pairs = [(c.name, c.a, c.b) for c in cfg.judge_comparisons()]
    assert pairs == [
        ("dpo_s0_vs_chosen", "dpo_s0", "chosen"),
        ("dpo_spo_s0_vs_chosen", "dpo_spo_s0", "chosen"),
        ("dpo_spo_s0_vs_dpo_s0", "dpo_spo_s0", "dpo_s0"),
        ("dpo_spo_s0_vs_sft", "dpo_spo_s0", "sft"),
        ("ipo_s0_vs_chosen", "ipo_s0", "chosen"),
        ("ipo_spo_s0_vs_chosen", "ipo_spo_s0", "chosen"),
        ("ipo_spo_s0_vs_ipo_s0", "ipo_spo_s0", "ipo_s0"),
        ("ipo_spo_s0_vs_sft", "ipo_spo_s0", "sft"),
        ("kto_spo_s0_vs_chosen", "kto_spo_s0", "chosen"),  # no KTO without SPO to compare with
        ("kto_spo_s0_vs_sft", "kto_spo_s0", "sft"),
    ]


def test_explicit_comparisons_replace_or_extend_the_automatic_ones() -> None:
    cfg = load_config(None, [
        "judge.comparisons=[{name: dpo_spo_s0_vs_sft, a: sft, b: dpo_spo_s0},"
        " {name: sft_vs_chosen, a: sft, b: chosen}]",
        "generate.models={}",
    ])
    pairs = [(c.name, c.a, c.b) for c in cfg.judge_comparisons()]
    assert pairs == [
        ("dpo_s0_vs_chosen", "dpo_s0", "chosen"),
        ("dpo_spo_s0_vs_chosen", "dpo_spo_s0", "chosen"),
        ("dpo_spo_s0_vs_dpo_s0", "dpo_spo_s0", "dpo_s0"),
        ("dpo_spo_s0_vs_sft", "sft", "dpo_spo_s0"),  # no sft generated: kept only because it is explicit
        ("sft_vs_chosen", "sft", "chosen"),
    ]
    cfg.judge.auto_comparisons = False
    assert [c.name for c in cfg.judge_comparisons()] == ["dpo_spo_s0_vs_sft", "sft_vs_chosen"]


def test_a_bare_no_for_mixed_precision_is_no_as_dvc_exp_run_writes_it(tmp_path) -> None:
    """`dvc exp run -S` writes params.yaml back without the quotes of "no"; PyYAML reads a bare no as false."""
    from spo.config import load_config
    from spo.errors import ConfigError

    params = tmp_path / "params.yaml"
    params.write_text("train:\n  mixed_precision: no\n")
    assert load_config(params, []).train.mixed_precision == "no"
    params.write_text("train:\n  mixed_precision: yes\n")
    with pytest.raises(ConfigError, match="mixed_precision"):  # true is no precision mode
        load_config(params, [])


def test_a_yaml_syntax_error_names_the_file_or_the_override_and_where(tmp_path) -> None:
    """Found by a new user: both were tracebacks."""
    from spo.cli import main
    from spo.config import load_config
    from spo.errors import ConfigError

    params = tmp_path / "params.yaml"
    params.write_text("seed: 0\ntrain:\n  beta: [0.1\n")
    with pytest.raises(ConfigError, match=rf"{params}: not valid YAML: .* at line 4, column 1"):
        load_config(params, [])
    with pytest.raises(ConfigError,
                       match=r"override 'train.beta=\[0.1': the value is not valid YAML \(.*line 1, column 5\)"):
        load_config(None, ["train.beta=[0.1"])
    assert main(["config", "-p", str(params)]) == 2  # a message and exit 2, not a traceback


def test_cross_section_mistakes_fail_when_the_params_are_read() -> None:
    """Found by a new user: levels_per_step above n_levels was accepted, and a batch that micro-batches do not
    divide was found only after the data had been tokenised."""
    from spo.config import load_config
    from spo.errors import ConfigError

    with pytest.raises(ConfigError,
                       match=r"train.spo.levels_per_step: 9 levels per step, but degrees.n_levels makes only 4"):
        load_config(None, ["train.spo.levels_per_step=9"])
    with pytest.raises(ConfigError, match=r"reward_model.optim.batch_size: 8 is not a multiple of micro_batch_size 3"):
        load_config(None, ["reward_model.optim.micro_batch_size=3"])
    with pytest.raises(ConfigError, match=r"sft.max_prompt_length: 96 must be below max_length 96"):
        load_config(None, ["sft.max_length=96", "sft.max_prompt_length=96"])
    assert load_config(None, ["degrees.n_levels=6", "train.spo.levels_per_step=6"]).train.spo.levels_per_step == 6
    kto_one_pair = ["train.loss=kto", "train.optim.batch_size=1", "train.optim.micro_batch_size=1"]
    with pytest.raises(ConfigError, match=r"train: .*optim.batch_size 1: loss kto needs at least 2 pairs per batch"):
        load_config(None, kto_one_pair)
