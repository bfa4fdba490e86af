"""Our trainer vs TRL's DPOTrainer on a GPU: a random-init Llama (~1.1B, or Llama-3-8B's shape), bf16 autocast, sdpa.

For when a GPU is lent (``bench/gpu.sh``; 15 minutes of device time per task, 10 per command). One
process, the configurations one after the other on the same weights and the same real HH pairs
(raw layout, prompt + response <= --max-length tokens, --batch pairs per step, one micro-batch):

* trl / trl_pre — TRL ``DPOTrainer`` (reference forward every step / precomputed), bf16 autocast
* dpo           — ours, DPO, precomputed reference, ``mixed_precision: bf16``
* spo_m2 / spo_all / spo_drop — ours with SPO (reencode 2 levels / all levels / drop mode)

``--model llama1b`` (default; TinyLlama-1.1B's shape, float32 master weights): each configuration
with full fine-tuning (bf16 autocast) and with LoRA r = 16. ``--model llama8b`` (Llama-3-8B's shape:
hidden 4096, 32 layers, 32 heads / 8 KV heads, intermediate 14336, a 128256-row embedding and LM
head; built on the GPU directly, weights in bf16): LoRA r = 16 for dpo, spo_m2 and trl_pre (the
adapters are float32 — peft keeps them so beside a bf16 base — so ``mixed_precision`` stays bf16
autocast as for TRL; the trainer's ``warn_half_weights`` warning, which looks at the base's dtype,
is expected), then full fine-tuning of dpo (float32 master weights, ``activation_checkpointing``,
fused AdamW, whose step needs no full-size temporaries as the foreach one does) only where the
16 bytes/parameter of float32 weights, gradients and two Adam moments (~120 GiB) are below the
GPU's memory — an H200, not an H100 — else a row "does not fit: X GiB needed". That row runs last
and converts the bf16 base in place (no second copy beside it). An OOM is a row, not a crash.
Tokenizer: both models use the BPE the script trains on 3000 HH texts (asked for 32000 tokens,
it learns ~24k); the embedding keeps the shape's rows (32000, 128256) whatever the tokenizer
uses, so the LM head costs what the real model's does.

Reported per configuration: median step time over --steps steps after --warmup, pairs/s, the
real tokens of the policy forward per second, model FLOPs utilisation and peak GPU memory. MFU
counts the policy's own training FLOPs: 6·N per token with full fine-tuning, 4·N with LoRA
(forward 2N, input gradients 2N, no weight gradients), N the parameters outside the embedding,
over the real (non-padding) tokens each trainer actually runs; attention FLOPs, activation
recomputation and the reference forward are not counted as useful work. Peak: 989 TFLOP/s dense
bf16 for H100/H200 (datasheet; KINDS.md measured ~790 on random data), else only TFLOP/s.

Beside each measured step, its arithmetic floor: the step's counted FLOPs over the peak, the
step time at 100% MFU, and measured/floor (= 1/MFU); none on a CPU (no peak).

The trainer's speed options, each numerically equal to the default path (``--options`` applies
them to our rows of the comparison, the sweep and the profile; the ablation picks them itself):
``fused`` = ``optim.optimizer: adamw_torch_fused``; ``flex`` = ``packed_attention: flex`` (flex
attention with a block mask; on a CPU the trainer keeps sdpa + the dense mask, logged);
``compile`` = ``compile: true`` with ``pad_to_multiple_of: 64`` (each decoder layer compiled).
LoRA's frozen-head log-probs need no option (``spo.training.forward.FrozenHeadLogps``).

Asked for only (with any of these flags the comparison above is skipped unless ``--configs``
names configurations; ``--budget`` seconds after the start, default 480 on a GPU, no new
measurement starts in any mode, and the JSON is rewritten after each mode, so a killed command
still leaves what it measured):

* ``--check``: before any timing, each speed path against the default on one batch
  (``--check-batch`` pairs, 8 on a GPU) of the benchmark's model and pairs, one optimizer step
  each (bf16 autocast on a GPU, float32 in --smoke): fused vs plain AdamW, flex vs the dense mask,
  compiled vs eager layers (full fine-tuning on llama1b, LoRA on llama8b), and LoRA's frozen-head
  log-probs vs the recomputing path (``_frozen_linear`` patched to ``lambda head: False`` for the
  reference); plus the default path against itself ("repeat": its own run-to-run difference).
  Compared: the policy log-probs of the step's pairs, the loss, the clipped gradients and the
  parameters after the step (max abs / rel; relative L2 norms of gradients and updates), PASS or
  FAIL against bf16 tolerances (log-probs and loss rtol 2e-2; gradients rel-L2 5e-2; updates
  rel-L2 0.25, as Adam's first update is lr·sign(g) and a near-zero gradient can flip sign under
  bf16 rounding; a gradient or update difference within twice the repeat's also passes); float32
  tolerances on a float32 CPU run. ~1.5-2 min on 1.1B (mostly the compile and flex kernels' first
  compilation); ``--check-budget`` seconds (default 150) stops starting new checks.
* ``--ablation``: ours dpo at ``--ablation-batch`` pairs (32 on a GPU; full fine-tuning on
  llama1b, LoRA on llama8b): baseline (today's settings), +fused, +flex, +compile, +all (the
  options that passed --check; an option that failed is measured but marked "not kept: not
  equal", one whose check raised "not kept: its check failed to run", one not checked "kept
  (unchecked)"); then spo_m2 and spo_all with the fastest kept combination, and trl_pre at the
  same batch. Per row: step ms, MFU, floor, peak GiB; then the issue's targets as PASS/FAIL lines:
  ours dpo MFU >= 40%, spo_m2/dpo <= 1.10, spo_all/dpo <= 1.25, dpo/trl_pre <= 0.4 (step time),
  peak memory of ours <= TRL's. ~3-4 min on 1.1B: 8 rows of 7 steps (9 for compiled rows, so that
  a recompilation for a new shape stays out of the 5 timed ones); a dpo step at batch 32 is ~8.2k
  tokens, 51 TFLOP: 51 ms at 100% MFU, 128 ms at 40% (TRL's runs each prompt twice, ~11.9k tokens);
  the rest is each trainer's set-up and the compilations (up to ~1 min each).
  ``--ablation-budget`` seconds (default 360) stops starting new rows.
* ``--profile [CONFIG]`` (default ``dpo``, full fine-tuning — LoRA on llama8b —, ``--profile-batch``
  pairs, 32 on a GPU): a ``torch.profiler`` trace of ``--profile-steps`` steps after a warm-up,
  summarised into shares of the step time by category (:func:`categorise`): matrix products,
  attention (sdpa and its mask), the LM head and log-probs, the degree heads, the optimizer
  (clipping, step, zero_grad), data collation / host-to-device, other device work, and host gaps
  (the step's wall time not covered by device kernels on CUDA, by profiled ops on a CPU). The
  trainer names its parts with ``record_function("spo/...")`` ranges; a backward op belongs to
  the range of the forward op it differentiates (the autograd sequence number links them).
* ``--sweep``: ours (dpo, spo_m2) and TRL precomputed at batch 8, 16, 32, ... until CUDA runs out
  of memory (the limit reported) or ``--sweep-max``; each with its median step, MFU and floor.

Durations on one H100/H200 (estimated from the FLOPs, not measured; a machine's start is extra):
the default comparison on llama1b < 8 min; ``--check --ablation`` ~5 min; ``--profile --sweep``
< 10 min; ``--model llama8b`` ~2-3 min (building the 8B model on the GPU takes seconds; a LoRA
step of 8 pairs is ~70 TFLOP, ~0.2 s; the full fine-tuning row, where it fits, ~0.5 s a step).
The recommended device calls (each a command of its own; see bench/gpu.sh for a bare machine):

  call 1: bench/gpu.sh --check --ablation --out "$OUT/gpu.json"           (timeout_s 600)
  call 2: bench/gpu.sh --model llama8b --out "$OUT/gpu_llama8b.json"      (timeout_s 420)

Call 1's --budget (480 s) stops new measurements in time for the command's limit, and what ran
is in $OUT even if it is killed; should it take more than ~7 minutes, give call 2 a --budget that
fits the device time left.

``--smoke``: the same code on CPU with a tiny model, float32, one step per configuration (sweep:
batch 2 and 4, profile, check and ablation: batch 2), so CI proves the script runs; its figures
mean nothing. ``--smoke --model llama8b``: a tiny shape with GQA (4 heads / 1 KV head), bf16
weights, an embedding larger than the tokenizer, LoRA and the full fine-tuning row.

Writes bench/results/gpu.json (gpu_llama8b.json for llama8b; or --out) and prints tables last.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import BETA, LR, hh_rows, pick_pairs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
CONFIGS = ("trl", "trl_pre", "dpo", "spo_m2", "spo_all", "spo_drop")
OURS = {"dpo": (False, "reencode", None), "spo_m2": (True, "reencode", 2), "spo_all": (True, "reencode", None),
        "spo_drop": (True, "drop", None)}  # (degree loss, mode, levels_per_step)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000)  # TinyLlama-1.1B's shape
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256)  # Llama-3-8B's shape
LLAMA_SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512)
LLAMA_8B_SMOKE = dict(hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, vocab_size=1024)  # GQA 4:1 as Llama-3-8B, more rows than the tokenizer
# shape, smoke shape, tokenizer vocabulary asked for (GPU, smoke), weights' dtype, what the checks/ablation/profile tune
MODELS = {
    "llama1b": {"shape": LLAMA_1B, "smoke": LLAMA_SMOKE, "tokenizer": (32000, 512), "dtype": "float32",
                "tuning": "full", "configs": ",".join(CONFIGS)},
    "llama8b": {"shape": LLAMA_8B, "smoke": LLAMA_8B_SMOKE, "tokenizer": (32000, 512), "dtype": "bfloat16",
                "tuning": "lora", "configs": "dpo,spo_m2,trl_pre"},
}
# the trainer's speed options (TrainConfig / OptimConfig fields), each numerically equal to the default path
OPTIONS = {"fused": {"optimizer": "adamw_torch_fused"}, "flex": {"packed_attention": "flex"},
           "compile": {"compile": True, "pad_to_multiple_of": 64}}
SWEEP = ("dpo", "spo_m2", "trl_pre")
# the profile's categories, in the table's order; shares of the step's wall time
CATEGORIES = ("matmul", "attention", "lm_head_logps", "degree_heads", "optimizer", "collate", "other", "host_gaps")
SCOPES = {"spo/lm_head_logps": "lm_head_logps", "spo/degree_heads": "degree_heads", "spo/optimizer": "optimizer",
          "spo/collate": "collate", "spo/attention_mask": "attention"}  # the trainer's record_function ranges
ATTENTION = ("scaled_dot_product", "flash", "fmha", "efficient_attention", "attention_kernel")
MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm", "gemm", "cutlass",
          "xmma", "cublas")
# --check's tolerances: bf16 (GPU autocast, or bf16 weights) and float32
TOLERANCES = {
    "bf16": {"logps_rtol": 2e-2, "logps_atol": 1e-2, "loss_rtol": 2e-2, "loss_atol": 1e-2, "grads_rel_l2": 5e-2,
             "update_rel_l2": 0.25},
    "float32": {"logps_rtol": 1e-4, "logps_atol": 1e-4, "loss_rtol": 1e-4, "loss_atol": 1e-5, "grads_rel_l2": 1e-3,
                "update_rel_l2": 1e-2},
}
# the targets, checked on the ablation's rows: (label, numerator, denominator, limit)
RATIO_TARGETS = (("spo_m2/dpo step", "spo_m2", "dpo", 1.10), ("spo_all/dpo step", "spo_all", "dpo", 1.25),
                 ("dpo/trl_pre step", "dpo", "trl_pre", 0.4))
MFU_TARGET = 0.40


def build(shape: dict, device: str, tokenizer_vocab: int | None = None, dtype: str = "float32"):  # noqa: ANN201
    """The random-init Llama of ``shape`` on ``device`` in ``dtype`` and the BPE trained for it
    (``tokenizer_vocab`` tokens asked for, default the shape's vocabulary; the embedding keeps the
    shape's rows either way)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from spo.models.tiny import train_tokenizer

    rows = hh_rows()
    tokenizer = train_tokenizer([r["chosen"] for r in rows[:3000]], tokenizer_vocab or shape["vocab_size"])
    tokenizer.chat_template = None  # raw layout: both trainers see the same ids
    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, attn_implementation="sdpa")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # built in its dtype on the device: no float32 copy of an 8B model
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model, tokenizer, rows


def lora_cfg():  # noqa: ANN201
    from spo.config import LoraConfig

    return LoraConfig(enabled=True, r=16, alpha=32, dropout=0.0)


def settings(options: Sequence[str], extra: dict | None = None) -> dict:
    """TrainConfig / OptimConfig fields of the named speed options (:data:`OPTIONS`), plus ``extra``."""
    out: dict = {}
    for name in options:
        out.update(OPTIONS[name])
    return {**out, **(extra or {})}


class Clock:
    """Wall time of each optimizer step, synchronised with the device."""

    def __init__(self, device: str) -> None:
        import torch

        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.marks: list[float] = []

    def mark(self) -> None:
        self.sync()
        self.marks.append(time.perf_counter())

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def run_trl(name: str, base, tokenizer, pairs: list[dict], args: argparse.Namespace, lora: bool, **_) -> dict:  # noqa: ANN001, ANN003
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    clock = Clock(args.device)

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):  # noqa: ANN002, ANN003
            clock.mark()

        def on_step_end(self, *a, **k):  # noqa: ANN002, ANN003
            clock.mark()

    peft_config = None
    if lora:
        from peft import LoraConfig

        c = lora_cfg()
        peft_config = LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=c.target_modules,
                                 task_type="CAUSAL_LM")
    dataset = Dataset.from_dict({k: [p[k] for p in pairs] for k in ("prompt", "chosen", "rejected")})
    config = DPOConfig(
        output_dir=str(Path(args.workdir) / "trl"), per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, beta=BETA,
        loss_type=["sigmoid"], max_length=args.max_length, bf16=args.device == "cuda", use_cpu=args.device == "cpu",
        activation_checkpointing=False, precompute_ref_log_probs=name == "trl_pre", report_to=[], save_strategy="no",
        logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0, seed=0, max_grad_norm=1.0,
    )
    trainer = DPOTrainer(model=copy.deepcopy(base), ref_model=None if lora else copy.deepcopy(base), args=config,
                         train_dataset=dataset, processing_class=tokenizer, callbacks=[Timer()],
                         peft_config=peft_config)
    tokens = sum(p["tokens"] for p in pairs)  # prompt twice + both responses: the rows TRL runs
    trainer.train()
    return {"step_times": clock.steps(), "tokens_per_step": tokens}


def ours_trainer(name: str, base, tokenizer, pairs: list[dict], args: argparse.Namespace, lora: bool, total: int,  # noqa: ANN001, ANN201
                 options: dict | None = None, consume: bool = False):
    """Our trainer for configuration ``name`` on a copy of ``base`` (``base`` itself when
    ``consume``), for ``total`` timed steps. ``options``: TrainConfig / OptimConfig fields over
    today's settings (:func:`settings`); none: the settings every earlier figure was taken with."""
    from spo.config import DegreeLossConfig, OptimConfig, TrainConfig
    from spo.models.loading import apply_lora
    from spo.training.trainer import PreferenceTrainer

    enabled, mode, levels = OURS[name]
    train_fields = dict(options or {})
    optim_fields = {k: train_fields.pop(k) for k in list(train_fields) if k in OptimConfig.model_fields}
    model = base if consume else copy.deepcopy(base)
    if lora:
        model = apply_lora(model, lora_cfg(), seed=0)  # seeded: --check's trainers start from the same adapters
    cfg = TrainConfig(
        loss="dpo", beta=BETA, spo=DegreeLossConfig(enabled=enabled, mode=mode, levels_per_step=levels),
        max_length=args.max_length, max_prompt_length=args.max_length - 1, precompute_reference=True,
        mixed_precision="bf16" if args.device == "cuda" else "no",
        optim=OptimConfig(learning_rate=LR, warmup_steps=0, lr_scheduler="constant", batch_size=args.batch,
                          micro_batch_size=args.batch, max_steps=total + 1, **optim_fields),
        logging_steps=10_000, eval_steps=10_000, save_steps=10_000, **train_fields,
    )
    rows = [{"id": str(p["index"]), "source": "hh", "prompt": p["prompt"], "chosen": p["chosen"],
             "rejected": p["rejected"]} for p in pairs]
    return PreferenceTrainer.from_rows(model, tokenizer, cfg, rows,
                                       [p["degrees"] for p in pairs] if enabled else None, seed=0, progress=False)


def run_ours(name: str, base, tokenizer, pairs: list[dict], args: argparse.Namespace, lora: bool,  # noqa: ANN001
             options: dict | None = None, consume: bool = False) -> dict:
    total = args.warmup + args.steps
    trainer = ours_trainer(name, base, tokenizer, pairs, args, lora, total, options, consume)
    clock = Clock(args.device)
    clock.mark()
    for step in range(1, total + 1):
        trainer.train(stop_after=step)
        clock.mark()
    batch = trainer.data.collator(trainer.data.train_examples, list(range(len(trainer.data.train_examples))), step=1)
    return {"step_times": clock.steps(), "tokens_per_step": batch.n_tokens, "attention": trainer.module.attn}


# ------------------------------------------------------------------ the profile

Event = tuple[str, float, str]  # (op or "op > kernel" name, self time in seconds, innermost spo/ range or "")


def category(name: str, scope: str) -> str:
    """The category of one event: the trainer's range it runs in first (a backward op counts in
    its forward op's range), then host-to-device copies, attention and matrix products by name."""
    if scope in SCOPES:
        return SCOPES[scope]
    low = name.lower()
    if "memcpy htod" in low:
        return "collate"
    if any(k in low for k in ATTENTION):
        return "attention"
    if any(k in low for k in MATMUL):
        return "matmul"
    return "other"


def categorise(events: list[Event], wall_s: float) -> dict[str, float]:
    """Shares of the step time by category (:data:`CATEGORIES`) from events' self times.

    ``wall_s``: the wall time of the profiled steps; what no event covers is ``host_gaps``. The
    events must not overlap (kernels of one stream, or ops' self times of one thread); should
    they sum past the wall anyway, the shares are of their sum, so they always add up to 1.
    """
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for name, seconds, scope in events:
        totals[category(name, scope)] += max(seconds, 0.0)
    covered = sum(totals.values())
    totals["host_gaps"] = max(wall_s - covered, 0.0)
    whole = max(wall_s, covered)
    return {k: (v / whole if whole > 0 else 0.0) for k, v in totals.items()}


def profiler_events(prof, cuda: bool) -> tuple[list[Event], float]:  # noqa: ANN001
    """The profile's events for :func:`categorise`, and the host time of the collation ranges.

    CUDA: every kernel (and memcpy) under its launching op, as "op > kernel" with its duration;
    CPU: every op's self CPU time (the ranges' own Python time included, the step roots not).
    Scope: the innermost ``spo/`` range above the op, or for an op run by the backward of a node
    the range of that node's forward op (same autograd sequence number).
    """
    events = [e for e in prof.events() if getattr(e.device_type, "name", "CPU") == "CPU" and not e.is_async]
    backward = "autograd::engine::evaluate_function"

    def direct(e) -> str:  # noqa: ANN001
        while e is not None:
            if e.name.startswith("spo/"):
                return e.name
            e = e.cpu_parent
        return ""

    forward = {e.sequence_nr: direct(e) for e in events
               if e.sequence_nr >= 0 and not e.name.startswith(backward) and "Backward" not in e.name}
    memo: dict[int, str] = {}

    def scope(e) -> str:  # noqa: ANN001
        chain, found = [], ""
        while e is not None:
            if id(e) in memo:
                found = memo[id(e)]
                break
            chain.append(e)
            if e.name.startswith("spo/"):
                found = e.name
                break
            if e.name.startswith(backward) and forward.get(e.sequence_nr):
                found = forward[e.sequence_nr]
                break
            e = e.cpu_parent
        for c in chain:
            memo[id(c)] = found
        return found

    out: list[Event] = []
    collate_host = 0.0
    for e in events:
        if e.name == "spo/collate":  # never nested in one another
            collate_host += e.cpu_time_total / 1e6
        if e.name.startswith("ProfilerStep"):
            continue
        if cuda:
            out.extend((f"{e.name} > {k.name}", k.duration / 1e6, scope(e)) for k in e.kernels)
        else:
            out.append((e.name, e.self_cpu_time_total / 1e6, scope(e)))
    return out, collate_host


def run_profile(name: str, base, tokenizer, pairs: list[dict], args: argparse.Namespace) -> dict:  # noqa: ANN001
    """Shares of one configuration's step time (full fine-tuning; LoRA on llama8b), and its heaviest ops."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device == "cuda"
    batch = args.profile_batch
    sub = argparse.Namespace(**{**vars(args), "batch": batch})
    warmup, steps = max(args.warmup, 1), args.profile_steps  # the first step pays one-off costs
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    lora = args.tuning == "lora"
    trainer = ours_trainer(name, base, tokenizer, pairs[:batch], sub, lora, warmup + steps, settings(args.options))
    for step in range(1, warmup + 1):
        trainer.train(stop_after=step)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    clock = Clock(args.device)
    with profile(activities=activities, record_shapes=False, with_stack=False) as prof:
        clock.mark()
        for step in range(warmup + 1, warmup + steps + 1):
            trainer.train(stop_after=step)
            clock.mark()
    times = clock.steps()
    wall = sum(times)
    events, collate_host = profiler_events(prof, cuda)
    shares = categorise(events, wall)
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    heaviest: dict[str, list] = {}
    for ev_name, seconds, scope in events:
        row = heaviest.setdefault(f"{ev_name} [{scope}]" if scope else ev_name, [0.0, category(ev_name, scope)])
        row[0] += seconds
    top = sorted(heaviest.items(), key=lambda kv: -kv[1][0])[:25]
    tokens = trainer.data.collator(trainer.data.train_examples, list(range(len(trainer.data.train_examples))),
                                   step=1).n_tokens
    del trainer
    gc.collect()
    return {
        "name": name, "lora": lora, "options": list(args.options), "batch": batch, "steps": steps,
        "step_s": wall / steps,
        "profiled_step_times": times, "tokens_per_step": tokens, "shares": shares,
        "collate_host_share": collate_host / wall if wall else 0.0,
        "time": "device kernels" if cuda else "CPU self time of ops",
        "top": [{"name": k[:200], "ms_per_step": v[0] * 1000 / steps, "category": v[1]} for k, v in top],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


# ------------------------------------------------------------------ measurements


def floor(flops: float, step: float, peak: float | None) -> dict:
    """The step at 100% MFU (its counted FLOPs over the peak) and measured / that; empty without a peak."""
    if not peak:
        return {}
    return {"mfu": flops / step / peak, "floor_s": flops / peak, "x_floor": step * peak / flops}


def is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def free_memory(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def guarded(args: argparse.Namespace, what: dict, run: Callable[[], dict]) -> dict:
    """``run()``'s row, or ``what`` with ``oom: True`` or the ``error`` it raised: one failing
    measurement must not lose the others (--smoke raises, so CI sees the bug)."""
    error = None
    try:
        row = run()
    except Exception as err:  # noqa: BLE001 - an OOM is an answer; anything else is reported
        if args.smoke:
            raise
        error = {"oom": True} if is_oom(err) else {"error": repr(err)[:500]}
    if error is not None:  # out of the except block: the traceback (and the trainer it holds) is gone
        free_memory(args.device)
        return {**what, **error}
    return row


def out_of_time(args: argparse.Namespace) -> bool:
    """Past ``--budget`` seconds since the start: no new measurement starts, in any mode."""
    return time.perf_counter() > args.deadline


def sweep(base, tokenizer, pairs: list[dict], args: argparse.Namespace, n_params: int, names: list[str]) -> list[dict]:  # noqa: ANN001
    """Each of ``names`` at batch sizes doubling from ``args.sweep_sizes[0]`` until out of memory."""
    rows = []
    started = time.perf_counter()
    lora = args.tuning == "lora"
    for name in names:
        for batch in args.sweep_sizes:
            if time.perf_counter() - started > args.sweep_budget or out_of_time(args):
                rows.append({"name": name, "batch": batch, "stopped": "time budget"})
                print(f"  sweep {name:<8} batch {batch:4d}  not run: sweep budget {args.sweep_budget:.0f} s spent",
                      flush=True)
                break
            sub = argparse.Namespace(**{**vars(args), "batch": batch})
            r = guarded(args, {"name": name, "lora": lora, "batch": batch},
                        functools.partial(measure, name, base, tokenizer, pairs[:batch], sub, lora, n_params,
                                          args.options))
            r["batch"] = batch
            rows.append(r)
            if "median_step_s" not in r:
                print(f"  sweep {name:<8} batch {batch:4d}  {'OUT OF MEMORY' if r.get('oom') else r['error']}",
                      flush=True)
                break
            print(f"  sweep {describe(r)}", flush=True)
    return rows


def describe(r: dict) -> str:
    mem = f"{r['peak_memory_gib']:.1f} GiB" if r.get("peak_memory_gib") is not None else "-"
    mfu = f"MFU {r['mfu'] * 100:5.1f}%  floor {r['floor_s'] * 1000:6.1f} ms ({r['x_floor']:.1f}x)" if "mfu" in r \
        else f"{r['tflops']:.2f} TFLOP/s  floor -"
    batch = f" batch {r['batch']:4d}" if "batch" in r else ""
    return (f"{'LoRA' if r['lora'] else 'full'} {r['name']:<9}{batch} step {r['median_step_s'] * 1000:7.1f} ms  "
            f"{r['pairs_per_s']:7.1f} pairs/s  {r['tokens_per_s']:9.0f} tok/s  {mfu}  peak {mem}")


def measure(name: str, base, tokenizer, pairs, args, lora: bool, n_params: int,  # noqa: ANN001
            options: Sequence[str] = (), extra: dict | None = None, consume: bool = False) -> dict:
    """One configuration's row; ``options``/``extra``: our trainer's speed options and other fields
    (:func:`settings`; TRL ignores them); ``consume``: our trainer takes ``base`` itself, no copy."""
    import torch

    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ours = not name.startswith("trl")
    if ours and "compile" in options and not args.smoke:  # two more warm-up steps: a shape's recompilation
        args = argparse.Namespace(**{**vars(args), "warmup": args.warmup + 2})
    started = time.perf_counter()
    if ours:
        result = run_ours(name, base, tokenizer, pairs, args, lora, settings(options, extra), consume)
    else:
        result = run_trl(name, base, tokenizer, pairs, args, lora)
    timed = result["step_times"][args.warmup:]
    step = statistics.median(timed)
    flops = (4 if lora else 6) * n_params * result["tokens_per_step"]
    out = {
        "name": name, "lora": lora, "median_step_s": step, "pairs_per_s": args.batch / step,
        "tokens_per_s": result["tokens_per_step"] / step, "tokens_per_step": result["tokens_per_step"],
        "tflops": flops / step / 1e12, "wall_s": time.perf_counter() - started,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
        **floor(flops, step, args.peak),
    }
    if ours:
        out.update({"options": list(options), "settings": settings(options, extra), "attention": result["attention"],
                    "warmup": args.warmup})
    gc.collect()
    return out


def memory_total_gib(device: str) -> float:
    """The device's memory: the GPU's, or the machine's RAM on a CPU."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def full_fine_tuning_row(base, tokenizer, pairs: list[dict], args: argparse.Namespace, n_params: int) -> dict:  # noqa: ANN001
    """llama8b's full fine-tuning of dpo, where 16 bytes/parameter fit the device: float32 master
    weights (the bf16 base converted in place — this row runs last), activation checkpointing,
    fused AdamW. Else a row saying what it would need; an OOM is a row too."""
    total = sum(p.numel() for p in base.parameters())
    need, have = 16 * total / 2**30, memory_total_gib(args.device)
    what = {"name": "dpo", "lora": False, "label": "full dpo (checkpointing, fused)", "estimate_gib": need,
            "device_gib": have}
    if need >= have:
        print(f"  full dpo       does not fit: {need:.1f} GiB needed (16 bytes x {total / 1e9:.2f} B parameters), "
              f"{have:.1f} GiB on {args.gpu}", flush=True)
        return {**what, "skipped": f"does not fit: {need:.1f} GiB needed, {have:.1f} GiB on the device"}
    if out_of_time(args):
        return {**what, "stopped": "time budget"}

    def run() -> dict:
        base.float()  # in place, parameter by parameter: no bf16 copy stays beside the float32 weights
        return {**what, **measure("dpo", base, tokenizer, pairs[:args.batch], args, False, n_params, ("fused",),
                                  {"activation_checkpointing": True}, consume=True)}

    r = guarded(args, what, run)
    print(f"  {describe(r)}  (checkpointing, fused AdamW)" if "median_step_s" in r
          else f"  full dpo       {'OUT OF MEMORY' if r.get('oom') else r.get('error')}", flush=True)
    return r


# ------------------------------------------------------------------ --check: each speed path against the default


def one_step(base, tokenizer, pairs: list[dict], args: argparse.Namespace, lora: bool,  # noqa: ANN001
             options: Sequence[str] = (), frozen_head: bool = True) -> dict:
    """One optimizer step of ours (dpo) on ``pairs`` as one batch: the policy log-probs and the
    loss of the step's forward, the clipped gradients the optimizer got, each trainable
    parameter's update, the attention in use and whether the frozen-head log-probs ran.
    ``frozen_head=False``: ``spo.training.forward._frozen_linear`` patched to ``lambda head: False``
    (the recomputing LM-head path, the reference of the frozen-head check)."""
    import torch

    from spo.training import forward

    saved = forward._frozen_linear
    used: list[bool] = []

    def counting(head) -> bool:  # noqa: ANN001
        used.append(saved(head))
        return used[-1]

    forward._frozen_linear = counting if frozen_head else (lambda head: False)
    try:
        sub = argparse.Namespace(**{**vars(args), "batch": len(pairs)})
        trainer = ours_trainer("dpo", base, tokenizer, pairs, sub, lora, 1, settings(options))
        named = [(n, p) for n, p in trainer.module.named_parameters() if p.requires_grad]
        before = [p.detach().clone() for _, p in named]
        got: dict = {}
        forward_loss, optimizer_step = trainer.stepper.forward_loss, trainer.optimizer.step

        def capture(*a, **k):  # noqa: ANN002, ANN003, ANN202
            out = forward_loss(*a, **k)
            got["logps"] = torch.cat([out.parts["chosen_logps"], out.parts["rejected_logps"]]).double()
            got["loss"] = float(out.parts["loss"])
            return out

        def snapshot(*a, **k):  # noqa: ANN002, ANN003, ANN202
            got["grads"] = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for _, p in named]
            return optimizer_step(*a, **k)

        trainer.stepper.forward_loss, trainer.optimizer.step = capture, snapshot
        trainer.train(stop_after=1)
        got["updates"] = [p.detach() - b for (_, p), b in zip(named, before)]
        got["names"] = [n for n, _ in named]
        got["attention"] = trainer.module.attn
        got["frozen_head"] = any(used)
    finally:
        forward._frozen_linear = saved
    trainer, before, named = None, [], []  # (the closures keep ``named``'s cell): the step's model goes
    free_memory(args.device)
    return got


def rel_l2(a: list, b: list) -> tuple[float, float]:
    """||a − b|| / ||b|| over all tensors together, and max |a − b|."""
    diff = sum(float((x.double() - y.double()).norm()) ** 2 for x, y in zip(a, b))
    ref = sum(float(y.double().norm()) ** 2 for y in b)
    max_abs = max((float((x - y).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)
    return (math.sqrt(diff / ref) if ref > 0 else math.sqrt(diff)), max_abs


def compare(ref: dict, new: dict, tol: dict, repeat: dict | None = None) -> dict:
    """The new path's step against the reference's: log-probs and loss (max abs/rel, allclose),
    gradients and updates (rel-L2, max abs); ``repeat``: the default path's own difference, twice
    which a gradient or update difference may also be."""
    if ref["names"] != new["names"]:
        return {"passed": False, "note": "different trainable parameters"}
    a, b = new["logps"], ref["logps"]
    d = (a - b).abs()
    logps = {"max_abs": float(d.max()), "max_rel": float((d / b.abs().clamp_min(1e-30)).max()),
             "ok": bool((d <= tol["logps_atol"] + tol["logps_rtol"] * b.abs()).all())}
    dl = abs(new["loss"] - ref["loss"])
    loss = {"ref": ref["loss"], "new": new["loss"], "abs": dl, "rel": dl / max(abs(ref["loss"]), 1e-30),
            "ok": dl <= tol["loss_atol"] + tol["loss_rtol"] * abs(ref["loss"])}
    out = {"logps": logps, "loss": loss}
    for key, tol_key, label in (("grads", "grads_rel_l2", "grads"), ("updates", "update_rel_l2", "params")):
        rel, max_abs = rel_l2(new[key], ref[key])
        limit = max(tol[tol_key], 2 * repeat[label]["rel_l2"]) if repeat and label in repeat else tol[tol_key]
        out[label] = {"rel_l2": rel, "max_abs": max_abs, "limit": limit, "ok": rel <= limit}
    out["params"]["max_abs_in_lr"] = out["params"]["max_abs"] / LR  # Adam's first step moves a weight by <= lr
    out["passed"] = all(out[k]["ok"] for k in ("logps", "loss", "grads", "params"))
    return out


CHECKS = {  # name: (what is compared, option names of the new path)
    "repeat": ("default path against itself (its run-to-run difference)", ()),
    "fused": ("fused vs plain AdamW", ("fused",)),
    "flex": ("flex attention (block mask) vs sdpa + dense mask", ("flex",)),
    "compile": ("compiled vs eager decoder layers (pad_to_multiple_of 64)", ("compile",)),
    "frozen_head": ("LoRA: frozen-head log-probs vs the recomputing LM head", ()),
}


def run_check(base, tokenizer, pairs: list[dict], args: argparse.Namespace, bf16: bool) -> dict:  # noqa: ANN001
    """Each speed path's step against the default path's on one batch (module docstring, --check)."""
    tol = TOLERANCES["bf16" if bf16 else "float32"]
    lora = args.tuning == "lora"
    batch = pairs[:args.check_batch]
    started = time.perf_counter()
    rows: list[dict] = []
    passed: dict[str, bool] = {}
    errors: dict[str, str] = {}  # the checks that did not run to a comparison (an option's own OOM or error)

    def budget_spent() -> bool:
        return time.perf_counter() - started > args.check_budget or out_of_time(args)

    def attempt(name: str, what: dict, run: Callable[[], dict]) -> dict | None:
        if budget_spent():
            rows.append({**what, "stopped": "time budget"})
            print(f"  check {name:<12} not run: check budget {args.check_budget:.0f} s spent", flush=True)
            return None
        got = guarded(args, what, run)
        if "logps" not in got:
            rows.append({**what, **got, "passed": False})
            print(f"  check {name:<12} {'OUT OF MEMORY' if got.get('oom') else got.get('error')}", flush=True)
            if name in OPTIONS or name == "frozen_head":
                errors[name] = "out of memory" if got.get("oom") else str(got.get("error"))
            return None
        return got

    def row(name: str, lora_row: bool) -> dict:
        return {"check": name, "what": CHECKS[name][0], "lora": lora_row, "options": list(CHECKS[name][1])}

    reference = attempt("reference", {"check": "reference", "lora": lora},
                        lambda: one_step(base, tokenizer, batch, args, lora))
    repeat = None
    for name in ("repeat", "fused", "flex", "compile"):
        if reference is None:
            break
        what = row(name, lora)
        new = attempt(name, what, functools.partial(one_step, base, tokenizer, batch, args, lora, CHECKS[name][1]))
        if new is None:
            continue
        result = {**what, "attention": new["attention"], **compare(reference, new, tol, repeat)}
        if name == "flex" and new["attention"] != "flex_attention":
            result["note"] = f"{args.device}: flex falls back to sdpa + the dense mask (no flex backward), as expected"
        if name == "repeat":
            repeat = result
        else:
            passed[name] = result["passed"]
        rows.append(result)
        print(f"  check {check_line(result)}", flush=True)
    # the frozen-head path against the recomputing one: LoRA (the default on llama8b is the frozen head already)
    what = row("frozen_head", True)
    frozen = reference if lora else attempt("frozen_head", what, lambda: one_step(base, tokenizer, batch, args, True))
    recomputed = None if frozen is None else attempt(
        "frozen_head", what, lambda: one_step(base, tokenizer, batch, args, True, frozen_head=False))
    if frozen is not None and recomputed is not None:
        result = {**what, "attention": frozen["attention"], **compare(recomputed, frozen, tol,
                                                                       repeat if lora else None)}
        if not frozen["frozen_head"]:
            result.update(passed=False, note="the LoRA step did not take the frozen-head path")
        passed["frozen_head"] = result["passed"]
        rows.append(result)
        print(f"  check {check_line(result)}", flush=True)
    return {"tolerances": tol, "precision": "bf16" if bf16 else "float32", "batch": len(batch), "rows": rows,
            "passed": passed, "errors": errors, "seconds": time.perf_counter() - started}


CHECK_HEADER = (f"{'path':<12} tune {'logps rel':>9} {'loss abs':>9} {'grads L2':>9} {'upd. L2':>9} {'param abs':>9}"
                "  result")


def check_line(r: dict) -> str:
    if "logps" not in r:
        what = "out of memory" if r.get("oom") else r.get("stopped") or r.get("error") or r.get("note", "")
        return f"{r['check']:<12} {'LoRA' if r['lora'] else 'full'} {what[:60]}"
    return (f"{r['check']:<12} {'LoRA' if r['lora'] else 'full'} {r['logps']['max_rel']:9.2e} {r['loss']['abs']:9.2e} "
            f"{r['grads']['rel_l2']:9.2e} {r['params']['rel_l2']:9.2e} {r['params']['max_abs']:9.2e}  "
            f"{'PASS' if r['passed'] else 'FAIL'}  {r.get('note', '')}")


# ------------------------------------------------------------------ --ablation: options one by one, then SPO, TRL


def option_status(option: str, check: dict | None) -> str:
    """Whether the ablation may keep an option: its --check passed, failed, raised, or was not run."""
    passed, errors = (check or {}).get("passed", {}), (check or {}).get("errors", {})
    if option in errors:
        return f"not kept: its check failed to run ({errors[option][:60]})"
    if option not in passed:
        return "kept (unchecked: run with --check)" if check is None else "kept (check not run)"
    return "kept" if passed[option] else "not kept: not equal"


def run_ablation(base, tokenizer, pairs: list[dict], args: argparse.Namespace, n_params: int,  # noqa: ANN001
                 check: dict | None) -> dict:
    """Ours dpo at ``--ablation-batch`` with today's settings, each option, the kept ones together;
    spo_m2 and spo_all with the fastest kept combination; trl_pre at the same batch; the targets."""
    lora = args.tuning == "lora"
    batch = args.ablation_batch
    sub = argparse.Namespace(**{**vars(args), "batch": batch})
    started = time.perf_counter()
    status = {o: option_status(o, check) for o in OPTIONS}
    kept = tuple(o for o in OPTIONS if status[o].startswith("kept"))
    plan: list[tuple[str, str, tuple[str, ...], str]] = [("baseline", "dpo", (), "today's settings")]
    plan += [(f"+{o}", "dpo", (o,), status[o]) for o in OPTIONS]
    if len(kept) == len(OPTIONS):
        plan.append(("+all", "dpo", kept, "kept"))
    elif len(kept) > 1:
        plan.append((f"+all kept ({'+'.join(kept)})", "dpo", kept, "kept"))
    rows: list[dict] = []

    def run(label: str, name: str, options: tuple[str, ...], state: str) -> dict:
        what = {"label": label, "name": name, "lora": lora, "batch": batch, "options": list(options), "status": state}
        if time.perf_counter() - started > args.ablation_budget or out_of_time(args):
            r = {**what, "stopped": "time budget"}
        else:
            r = {**what, **guarded(args, what, lambda: measure(name, base, tokenizer, pairs[:batch], sub, lora,
                                                                n_params, options))}
        rows.append(r)
        print(f"  ablation {ablation_line(r)}", flush=True)
        return r

    for label, name, options, state in plan:
        run(label, name, options, state)
    eligible = [r for r in rows if "median_step_s" in r
                and (r["status"] == "today's settings" or r["status"].startswith("kept"))]
    best = min(eligible, key=lambda r: r["median_step_s"]) if eligible else None
    if best is not None:
        best["best"] = True
        for name in ("spo_m2", "spo_all"):
            run(f"{name} ({best['label']})", name, tuple(best["options"]), "fastest kept combination")
    if not args.no_trl:
        run("trl_pre", "trl_pre", (), "TRL, precomputed reference")
    return {"batch": batch, "lora": lora, "options": status, "best": best["label"] if best else None, "rows": rows,
            "verdicts": verdicts(rows, best), "seconds": time.perf_counter() - started}


def verdicts(rows: list[dict], best: dict | None) -> list[dict]:
    """The issue's targets on the ablation's rows: PASS, FAIL or n/a (a row missing, no peak, no GPU memory)."""
    done = {r["name"]: r for r in rows if "median_step_s" in r and r["name"] != "dpo"}
    if best is not None:
        done["dpo"] = best
    out = []

    def verdict(target: str, value: float | None, ok: bool | None, shown: str, why: str = "") -> None:
        out.append({"target": target, "value": value, "verdict": "n/a" if ok is None else "PASS" if ok else "FAIL",
                    "shown": shown if ok is not None else why})

    dpo = done.get("dpo")
    mfu = dpo.get("mfu") if dpo else None
    verdict(f"ours dpo MFU >= {MFU_TARGET:.0%}", mfu, None if mfu is None else mfu >= MFU_TARGET,
            f"{(mfu or 0) * 100:.1f}%", "no dpo row" if dpo is None else "no peak FLOP/s for this device")
    for target, num, den, limit in RATIO_TARGETS:
        if num in done and den in done:
            ratio = done[num]["median_step_s"] / done[den]["median_step_s"]
            verdict(f"{target} <= {limit:.2f}", ratio, ratio <= limit, f"{ratio:.2f}")
        else:
            verdict(f"{target} <= {limit:.2f}", None, None, "", f"no {num if num not in done else den} row")
    ours = [done[n]["peak_memory_gib"] for n in ("dpo", "spo_m2", "spo_all") if n in done]
    trl = done.get("trl_pre", {}).get("peak_memory_gib")
    if ours and trl is not None and all(m is not None for m in ours):
        verdict("peak memory of ours <= TRL's", max(ours), max(ours) <= trl, f"{max(ours):.1f} GiB vs {trl:.1f} GiB")
    else:
        verdict("peak memory of ours <= TRL's", None, None, "", "no GPU memory figures" if "trl_pre" in done
                else "no trl_pre row")
    return out


def ablation_line(r: dict) -> str:
    label = f"{r['label']:<28}"
    if "median_step_s" not in r:
        what = "OUT OF MEMORY" if r.get("oom") else r.get("stopped") or r.get("error", "")
        return f"{label} {what}"
    return f"{label} {describe(r)}  [{r['status']}]"


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, one step: proves the script runs")
    parser.add_argument("--model", choices=sorted(MODELS), default="llama1b",
                        help="llama1b: TinyLlama-1.1B's shape, float32; llama8b: Llama-3-8B's shape, bf16 weights")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step (one micro-batch)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated, of {','.join(CONFIGS)} (default: all on llama1b, dpo,spo_m2,trl_pre "
                        "on llama8b; none with --check/--ablation/--profile/--sweep)")
    parser.add_argument("--options", default="",
                        help=f"comma-separated speed options of ours, of {','.join(OPTIONS)}, for the comparison, "
                        "the sweep and the profile (default: none, today's settings)")
    parser.add_argument("--no-trl", action="store_true", help="skip TRL (when trl is not installed)")
    parser.add_argument("--check", action="store_true", help="each speed path against the default, one step")
    parser.add_argument("--check-batch", type=int, default=None, help="pairs of the checked step (default 8)")
    parser.add_argument("--check-budget", type=float, default=150.0,
                        help="seconds after which --check starts no new step")
    parser.add_argument("--ablation", action="store_true", help="ours dpo with each speed option, SPO and TRL")
    parser.add_argument("--ablation-batch", type=int, default=None, help="pairs per ablation step (default 32)")
    parser.add_argument("--ablation-budget", type=float, default=360.0,
                        help="seconds after which the ablation starts no new row")
    parser.add_argument("--profile", nargs="?", const="dpo", default=None, choices=sorted(OURS), metavar="CONFIG",
                        help="profile one configuration of ours, full fine-tuning (default dpo)")
    parser.add_argument("--profile-batch", type=int, default=None, help="pairs per profiled step (default 32)")
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps, after --warmup")
    parser.add_argument("--trace", type=Path, default=None, help="also write the profile's Chrome trace here")
    parser.add_argument("--sweep", action="store_true", help=f"batch sizes 8, 16, ... until OOM for {','.join(SWEEP)}")
    parser.add_argument("--sweep-max", type=int, default=256, help="the largest batch the sweep tries")
    parser.add_argument("--sweep-budget", type=float, default=300.0,
                        help="seconds after which the sweep starts no new measurement")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds after the start after which no new measurement starts, in any mode "
                        "(default 480 on a GPU, none in --smoke)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON (default bench/results/gpu.json; gpu_llama8b.json for llama8b)")
    args = parser.parse_args()

    import torch
    import torch._dynamo.config

    # one process compiles the layers of many trainers: each graph (grad / no grad, sdpa / flex, static /
    # dynamic shapes) counts against dynamo's limit per function (8), past which it runs them eagerly
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    started = time.perf_counter()
    model = MODELS[args.model]
    args.tuning = model["tuning"]
    args.options = tuple(o for o in args.options.split(",") if o)
    unknown = [o for o in args.options if o not in OPTIONS]
    if unknown:
        parser.error(f"--options {','.join(unknown)}: not of {','.join(OPTIONS)}")
    if args.smoke:
        args.device, args.steps, args.warmup, args.batch, args.max_length = "cpu", 1, 0, 2, 160
        args.profile_steps, args.sweep_sizes = min(args.profile_steps, 2), [2, 4]
        args.profile_batch = args.profile_batch or 2
        args.check_batch, args.ablation_batch = args.check_batch or 2, args.ablation_batch or 2
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            sys.exit("no GPU: run with --smoke on a CPU")
        args.device = "cuda"
        args.sweep_sizes = [8 * 2**i for i in range(12) if 8 * 2**i <= args.sweep_max]
        args.profile_batch = args.profile_batch or 32
        args.check_batch, args.ablation_batch = args.check_batch or 8, args.ablation_batch or 32
    budget = args.budget if args.budget is not None else (math.inf if args.smoke else 480.0)
    args.deadline = started + budget
    out_path = args.out or REPO / "bench" / "results" / ("gpu.json" if args.model == "llama1b" else
                                                         f"gpu_{args.model}.json")
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    args.gpu = gpu
    args.peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    args.workdir = os.environ.get("TMPDIR", "/tmp")
    asked = args.profile or args.sweep or args.check or args.ablation
    configs = args.configs if args.configs is not None else ("" if asked else model["configs"])
    names = [c for c in configs.split(",") if c and not (args.no_trl and c.startswith("trl"))]
    sweep_names = [c for c in SWEEP if not (args.no_trl and c.startswith("trl"))] if args.sweep else []
    shape, tokenizer_vocab = (model["smoke"], model["tokenizer"][1]) if args.smoke else \
        (model["shape"], model["tokenizer"][0])
    base, tokenizer, rows = build(shape, args.device, tokenizer_vocab, model["dtype"])
    n_params = sum(p.numel() for n, p in base.named_parameters() if "embed_tokens" not in n)
    wanted = max([args.batch if names else 0, args.profile_batch if args.profile else 0,
                  max(args.sweep_sizes) if args.sweep else 0, args.check_batch if args.check else 0,
                  args.ablation_batch if args.ablation else 0, 1])
    pairs = pick_pairs(rows, tokenizer, wanted, args.max_length)
    if len(pairs) < wanted:
        print(f"  only {len(pairs)} pairs fit {args.max_length} tokens: larger batches are not run", flush=True)
        args.sweep_sizes = [b for b in args.sweep_sizes if b <= len(pairs)]
        args.profile_batch = min(args.profile_batch, len(pairs))
        args.check_batch, args.ablation_batch = min(args.check_batch, len(pairs)), min(args.ablation_batch, len(pairs))
    bf16 = args.device == "cuda" or model["dtype"] == "bfloat16"
    print(f"{gpu}: {args.model}{' (smoke shape)' if args.smoke else ''} "
          f"{sum(p.numel() for p in base.parameters()) / 1e9:.2f} B parameters "
          f"({n_params / 1e9:.2f} B outside the embedding; {shape['vocab_size']} embedding rows, tokenizer "
          f"{len(tokenizer)} ids), {model['dtype']} weights, {len(pairs)} pairs x <= {args.max_length} tokens, "
          f"{'bf16 autocast' if args.device == 'cuda' else 'no autocast'}, sdpa"
          + (f", options {','.join(args.options)}" if args.options else ""), flush=True)
    report: dict = {"device": gpu, "smoke": args.smoke, "model": args.model, "shape": shape,
                    "tokenizer_ids": len(tokenizer), "weights_dtype": model["dtype"],
                    "settings": {k: str(v) for k, v in vars(args).items()}, "results": [], "ratios": {},
                    "check": None, "ablation": None, "profile": None, "sweep": [], "full_fine_tuning": None}

    def save() -> None:  # after each mode: a command killed later still leaves what it measured
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps({**report, "seconds": time.perf_counter() - started}, indent=2))

    if args.check:
        print(f"check: one step of each path, batch {args.check_batch}, {args.tuning} "
              f"({'bf16' if bf16 else 'float32'} tolerances)", flush=True)
        print(f"  check {CHECK_HEADER}", flush=True)
        report["check"] = run_check(base, tokenizer, pairs, args, bf16)
        save()
    if args.ablation:
        print(f"ablation: ours dpo, {args.tuning}, batch {args.ablation_batch}", flush=True)
        report["ablation"] = run_ablation(base, tokenizer, pairs, args, n_params, report["check"])
        save()
    results = report["results"]
    loras = (True,) if args.tuning == "lora" else (False, True)
    for lora in loras:
        for name in names:
            if out_of_time(args):
                r = {"name": name, "lora": lora, "stopped": "time budget"}
            else:
                r = guarded(args, {"name": name, "lora": lora}, functools.partial(
                    measure, name, base, tokenizer, pairs[:args.batch], args, lora, n_params, args.options))
            results.append(r)
            if "median_step_s" not in r:
                print(f"  {'LoRA' if lora else 'full'} {name:<9} "
                      f"{'OUT OF MEMORY' if r.get('oom') else r.get('stopped') or 'FAILED ' + r['error']}",
                      flush=True)
                continue
            print(f"  {describe(r)}", flush=True)
    ratios = report["ratios"]
    for lora in (False, True):
        ok = {r["name"]: r for r in results if r["lora"] == lora and "median_step_s" in r}
        for num, den in (("dpo", "trl_pre"), ("dpo", "trl"), ("spo_m2", "dpo"), ("spo_all", "dpo"),
                         ("spo_drop", "dpo")):
            if num in ok and den in ok:
                key = f"{'lora' if lora else 'full'} {num}/{den}"
                ratios[key] = {"step": ok[num]["median_step_s"] / ok[den]["median_step_s"]}
                if ok[num]["peak_memory_gib"]:
                    ratios[key]["memory"] = ok[num]["peak_memory_gib"] / ok[den]["peak_memory_gib"]
    for key, value in ratios.items():
        print(f"  {key:<24} step {value['step']:.2f}"
              + (f"  memory {value['memory']:.2f}" if "memory" in value else ""))
    if names:
        save()
    if args.profile:
        if out_of_time(args):
            report["profile"] = {"name": args.profile, "stopped": "time budget"}
        else:
            report["profile"] = guarded(args, {"name": args.profile},
                                        lambda: run_profile(args.profile, base, tokenizer, pairs, args))
        if "shares" not in report["profile"]:
            print(f"  profile {args.profile} not run: {report['profile']}", flush=True)
        save()
    if sweep_names:
        report["sweep"] = sweep(base, tokenizer, pairs, args, n_params, sweep_names)
        save()
    if args.tuning == "lora" and "dpo" in names:  # llama8b: full fine-tuning last, where it fits (it takes the base)
        report["full_fine_tuning"] = full_fine_tuning_row(base, tokenizer, pairs, args, n_params)
    save()
    print(f"wrote {out_path} in {time.perf_counter() - started:.0f} s")
    print_tables(report)


def print_tables(report: dict) -> None:
    """The tables printed last: the checks, the ablation and its verdicts, each measured step beside
    its floor, the profile's shares."""
    check, ablation, profiled = report["check"], report["ablation"], report["profile"]
    if check:
        print(f"check ({check['precision']} tolerances: log-probs rtol {check['tolerances']['logps_rtol']:g}, "
              f"loss rtol {check['tolerances']['loss_rtol']:g}, grads rel-L2 {check['tolerances']['grads_rel_l2']:g}, "
              f"updates rel-L2 {check['tolerances']['update_rel_l2']:g}; batch {check['batch']})")
        print(CHECK_HEADER)
        for r in check["rows"]:
            print(check_line(r))
    if ablation:
        print(f"ablation: ours dpo, {'LoRA' if ablation['lora'] else 'full'}, batch {ablation['batch']}; fastest kept: "
              f"{ablation['best']}")
        print(f"{'configuration':<28} {'step ms':>9} {'floor ms':>9} {'x floor':>8} {'MFU':>7} {'GiB':>6}  option")
        for r in ablation["rows"]:
            print(f"{r['label']:<28} {figures(r)}  {r['status']}")
        for v in ablation["verdicts"]:
            print(f"{v['verdict']:<5} {v['target']}: {v['shown']}")
    full = report.get("full_fine_tuning")
    rows = [(f"{'lora' if r['lora'] else 'full'} {r['name']}" + (f" b{r['batch']}" if "batch" in r else ""), r)
            for r in (*report["results"], *report["sweep"], *([full] if full else []))]
    width = max([22, *(len(r.get("label", label)) for label, r in rows)])
    if rows:
        print(f"{'configuration':<{width}} {'step ms':>9} {'floor ms':>9} {'x floor':>8} {'MFU':>7} {'GiB':>6}")
    for label, r in rows:
        print(f"{r.get('label', label):<{width}} {figures(r)}")
    if profiled and "shares" in profiled:
        print(f"profile: {profiled['name']}, {'LoRA' if profiled['lora'] else 'full'}, batch {profiled['batch']}, "
              f"{profiled['steps']} steps of {profiled['step_s'] * 1000:.1f} ms ({profiled['time']}; collation's host "
              f"time {profiled['collate_host_share'] * 100:.1f}% of the step)")
        print(f"{'category':<16} {'share':>7} {'ms/step':>9}")
        for k in CATEGORIES:
            share = profiled["shares"][k]
            print(f"{k:<16} {share * 100:6.1f}% {share * profiled['step_s'] * 1000:9.2f}")


def figures(r: dict) -> str:
    """A row's step, floor, x floor, MFU and peak GiB, or why it has none."""
    if "median_step_s" not in r:
        return "out of memory" if r.get("oom") else r.get("skipped") or r.get("stopped") or r.get("error", "")[:60]
    fl = f"{r['floor_s'] * 1000:9.1f} {r['x_floor']:8.1f} {r['mfu'] * 100:6.1f}%" if "mfu" in r \
        else f"{'none':>9} {'-':>8} {'-':>7}"
    mem = f"{r['peak_memory_gib']:6.1f}" if r.get("peak_memory_gib") is not None else f"{'-':>6}"
    return f"{r['median_step_s'] * 1000:9.1f} {fl} {mem}"


if __name__ == "__main__":
    main()
