"""Our trainer vs TRL's DPOTrainer on a GPU: a ~1B random-init Llama in bf16 with sdpa, full and LoRA.

For when a GPU is lent (``bench/gpu.sh``, under 8 minutes on one H100/H200). One process, the
configurations one after the other on the same weights and the same real HH pairs (raw layout,
prompt + response <= --max-length tokens, --batch pairs per step, one micro-batch):

* trl / trl_pre — TRL ``DPOTrainer`` (reference forward every step / precomputed), bf16 autocast
* dpo           — ours, DPO, precomputed reference, ``mixed_precision: bf16``
* spo_m2 / spo_all / spo_drop — ours with SPO (reencode 2 levels / all levels / drop mode)

each with full fine-tuning (float32 master weights, bf16 autocast) and with LoRA r = 16.
Reported per configuration: median step time over --steps steps after --warmup, pairs/s, the
real tokens of the policy forward per second, model FLOPs utilisation and peak GPU memory. MFU
counts the policy's own training FLOPs: 6·N per token with full fine-tuning, 4·N with LoRA
(forward 2N, input gradients 2N, no weight gradients), N the parameters outside the embedding,
over the real (non-padding) tokens each trainer actually runs; attention FLOPs and the
reference forward are not counted as useful work. Peak: 989 TFLOP/s dense bf16 for H100/H200
(datasheet; KINDS.md measured ~790 on random data), else only TFLOP/s are printed.

Beside each measured step, its arithmetic floor: the step's counted FLOPs over the peak, the
step time at 100% MFU, and measured/floor (= 1/MFU); none on a CPU (no peak).

Asked for only (the default run stays under 8 minutes; with either flag the comparison above is
skipped unless ``--configs`` names configurations, so ``--profile --sweep`` fits one 10-minute
command):

* ``--profile [CONFIG]`` (default ``dpo``, full fine-tuning, ``--profile-batch`` pairs, 32 on a
  GPU): a ``torch.profiler`` trace of ``--profile-steps`` steps after a warm-up, summarised into
  shares of the step time by category (:func:`categorise`): matrix products, attention (sdpa and
  its mask), the LM head and log-probs, the degree heads, the optimizer (clipping, step,
  zero_grad), data collation / host-to-device, other device work, and host gaps (the step's wall
  time not covered by device kernels on CUDA, by profiled ops on a CPU). The trainer names its
  parts with ``record_function("spo/...")`` ranges; a backward op belongs to the range of the
  forward op it differentiates (the autograd sequence number links them).
* ``--sweep``: ours (dpo, spo_m2) and TRL precomputed at batch 8, 16, 32, ... until CUDA runs out
  of memory (the limit reported) or ``--sweep-max``; each with its median step, MFU and floor.

``--smoke``: the same code on CPU with a tiny model, float32, one step per configuration (sweep:
batch 2 and 4, profile: batch 2), so CI proves the script runs; its figures mean nothing.

Writes bench/results/gpu.json (or --out) and prints a short table last.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
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
LLAMA_SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512)
SWEEP = ("dpo", "spo_m2", "trl_pre")
# the profile's categories, in the table's order; shares of the step's wall time
CATEGORIES = ("matmul", "attention", "lm_head_logps", "degree_heads", "optimizer", "collate", "other", "host_gaps")
SCOPES = {"spo/lm_head_logps": "lm_head_logps", "spo/degree_heads": "degree_heads", "spo/optimizer": "optimizer",
          "spo/collate": "collate", "spo/attention_mask": "attention"}  # the trainer's record_function ranges
ATTENTION = ("scaled_dot_product", "flash", "fmha", "efficient_attention", "attention_kernel")
MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm", "gemm", "cutlass",
          "xmma", "cublas")


def build(shape: dict, device: str):  # noqa: ANN201
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from spo.models.tiny import train_tokenizer

    rows = hh_rows()
    tokenizer = train_tokenizer([r["chosen"] for r in rows[:3000]], shape["vocab_size"])
    tokenizer.chat_template = None  # raw layout: both trainers see the same ids
    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model, tokenizer, rows


def lora_cfg():  # noqa: ANN201
    from spo.config import LoraConfig

    return LoraConfig(enabled=True, r=16, alpha=32, dropout=0.0)


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


def run_trl(name: str, base, tokenizer, pairs: list[dict], args: argparse.Namespace, lora: bool) -> dict:  # noqa: ANN001
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


def ours_trainer(name: str, base, tokenizer, pairs: list[dict], args: argparse.Namespace, lora: bool, total: int):  # noqa: ANN001, ANN201
    """Our trainer for configuration ``name`` on a copy of ``base``, for ``total`` timed steps."""
    from spo.config import DegreeLossConfig, OptimConfig, TrainConfig
    from spo.models.loading import apply_lora
    from spo.training.trainer import PreferenceTrainer

    enabled, mode, levels = OURS[name]
    model = copy.deepcopy(base)
    if lora:
        model = apply_lora(model, lora_cfg())
    cfg = TrainConfig(
        loss="dpo", beta=BETA, spo=DegreeLossConfig(enabled=enabled, mode=mode, levels_per_step=levels),
        max_length=args.max_length, max_prompt_length=args.max_length - 1, precompute_reference=True,
        mixed_precision="bf16" if args.device == "cuda" else "no",
        optim=OptimConfig(learning_rate=LR, warmup_steps=0, lr_scheduler="constant", batch_size=args.batch,
                          micro_batch_size=args.batch, max_steps=total + 1),
        logging_steps=10_000, eval_steps=10_000, save_steps=10_000,
    )
    rows = [{"id": str(p["index"]), "source": "hh", "prompt": p["prompt"], "chosen": p["chosen"],
             "rejected": p["rejected"]} for p in pairs]
    return PreferenceTrainer.from_rows(model, tokenizer, cfg, rows,
                                       [p["degrees"] for p in pairs] if enabled else None, seed=0, progress=False)


def run_ours(name: str, base, tokenizer, pairs: list[dict], args: argparse.Namespace, lora: bool) -> dict:  # noqa: ANN001
    total = args.warmup + args.steps
    trainer = ours_trainer(name, base, tokenizer, pairs, args, lora, total)
    clock = Clock(args.device)
    clock.mark()
    for step in range(1, total + 1):
        trainer.train(stop_after=step)
        clock.mark()
    batch = trainer.data.collator(trainer.data.train_examples, list(range(len(trainer.data.train_examples))), step=1)
    return {"step_times": clock.steps(), "tokens_per_step": batch.n_tokens}


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
    """Shares of one configuration's step time (full fine-tuning), and its heaviest ops."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device == "cuda"
    batch = args.profile_batch
    sub = argparse.Namespace(**{**vars(args), "batch": batch})
    warmup, steps = max(args.warmup, 1), args.profile_steps  # the first step pays one-off costs
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = ours_trainer(name, base, tokenizer, pairs[:batch], sub, False, warmup + steps)
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
        "name": name, "lora": False, "batch": batch, "steps": steps, "step_s": wall / steps,
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


def sweep(base, tokenizer, pairs: list[dict], args: argparse.Namespace, n_params: int, names: list[str]) -> list[dict]:  # noqa: ANN001
    """Each of ``names`` at batch sizes doubling from ``args.sweep_sizes[0]`` until out of memory."""
    import torch

    rows = []
    started = time.perf_counter()
    for name in names:
        for batch in args.sweep_sizes:
            if time.perf_counter() - started > args.sweep_budget:
                rows.append({"name": name, "batch": batch, "stopped": "time budget"})
                print(f"  sweep {name:<8} batch {batch:4d}  not run: sweep budget {args.sweep_budget:.0f} s spent",
                      flush=True)
                break
            sub = argparse.Namespace(**{**vars(args), "batch": batch})
            error = None
            try:
                r = measure(name, base, tokenizer, pairs[:batch], sub, False, n_params)
            except Exception as err:  # noqa: BLE001 - an OOM is the sweep's answer; anything else is reported
                if args.smoke:
                    raise
                error = ("oom", "out of memory") if is_oom(err) else ("error", repr(err)[:500])
            if error is not None:
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                rows.append({"name": name, "batch": batch, error[0]: error[1] if error[0] == "error" else True})
                print(f"  sweep {name:<8} batch {batch:4d}  {'OUT OF MEMORY' if error[0] == 'oom' else error[1]}",
                      flush=True)
                break
            r["batch"] = batch
            rows.append(r)
            print(f"  sweep {describe(r)}", flush=True)
    return rows


def describe(r: dict) -> str:
    mem = f"{r['peak_memory_gib']:.1f} GiB" if r.get("peak_memory_gib") is not None else "-"
    mfu = f"MFU {r['mfu'] * 100:5.1f}%  floor {r['floor_s'] * 1000:6.1f} ms ({r['x_floor']:.1f}x)" if "mfu" in r \
        else f"{r['tflops']:.2f} TFLOP/s  floor -"
    batch = f" batch {r['batch']:4d}" if "batch" in r else ""
    return (f"{'LoRA' if r['lora'] else 'full'} {r['name']:<9}{batch} step {r['median_step_s'] * 1000:7.1f} ms  "
            f"{r['pairs_per_s']:7.1f} pairs/s  {r['tokens_per_s']:9.0f} tok/s  {mfu}  peak {mem}")


def measure(name: str, base, tokenizer, pairs, args, lora: bool, n_params: int) -> dict:  # noqa: ANN001
    import torch

    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    runner = run_trl if name.startswith("trl") else run_ours
    started = time.perf_counter()
    result = runner(name, base, tokenizer, pairs, args, lora)
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
    gc.collect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, one step: proves the script runs")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step (one micro-batch)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated, of {','.join(CONFIGS)} (default: all; none with --profile/--sweep)")
    parser.add_argument("--no-trl", action="store_true", help="skip TRL (when trl is not installed)")
    parser.add_argument("--profile", nargs="?", const="dpo", default=None, choices=sorted(OURS), metavar="CONFIG",
                        help="profile one configuration of ours, full fine-tuning (default dpo)")
    parser.add_argument("--profile-batch", type=int, default=None, help="pairs per profiled step (default 32)")
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps, after --warmup")
    parser.add_argument("--trace", type=Path, default=None, help="also write the profile's Chrome trace here")
    parser.add_argument("--sweep", action="store_true", help=f"batch sizes 8, 16, ... until OOM for {','.join(SWEEP)}")
    parser.add_argument("--sweep-max", type=int, default=256, help="the largest batch the sweep tries")
    parser.add_argument("--sweep-budget", type=float, default=300.0,
                        help="seconds after which the sweep starts no new measurement")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu.json")
    args = parser.parse_args()

    import torch

    if args.smoke:
        args.device, args.steps, args.warmup, args.batch, args.max_length = "cpu", 1, 0, 2, 160
        args.profile_steps, args.sweep_sizes = min(args.profile_steps, 2), [2, 4]
        args.profile_batch = args.profile_batch or 2
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            sys.exit("no GPU: run with --smoke on a CPU")
        args.device = "cuda"
        args.sweep_sizes = [8 * 2**i for i in range(12) if 8 * 2**i <= args.sweep_max]
        args.profile_batch = args.profile_batch or 32
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    args.peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    args.workdir = os.environ.get("TMPDIR", "/tmp")
    configs = args.configs if args.configs is not None else ("" if args.profile or args.sweep else ",".join(CONFIGS))
    names = [c for c in configs.split(",") if c and not (args.no_trl and c.startswith("trl"))]
    sweep_names = [c for c in SWEEP if not (args.no_trl and c.startswith("trl"))] if args.sweep else []
    started = time.perf_counter()
    base, tokenizer, rows = build(LLAMA_SMOKE if args.smoke else LLAMA_1B, args.device)
    n_params = sum(p.numel() for n, p in base.named_parameters() if "embed_tokens" not in n)
    wanted = max([args.batch if names else 0, args.profile_batch if args.profile else 0,
                  max(args.sweep_sizes) if args.sweep else 0, 1])
    pairs = pick_pairs(rows, tokenizer, wanted, args.max_length)
    if len(pairs) < wanted:
        print(f"  only {len(pairs)} pairs fit {args.max_length} tokens: larger batches are not run", flush=True)
        args.sweep_sizes = [b for b in args.sweep_sizes if b <= len(pairs)]
        args.profile_batch = min(args.profile_batch, len(pairs))
    print(f"{gpu}: Llama {sum(p.numel() for p in base.parameters()) / 1e9:.2f} B parameters "
          f"({n_params / 1e9:.2f} B outside the embedding), {len(pairs)} pairs x <= {args.max_length} tokens, "
          f"{'bf16 autocast' if args.device == 'cuda' else 'float32'}, sdpa", flush=True)
    results = []
    for lora in (False, True):
        for name in names:
            try:
                r = measure(name, base, tokenizer, pairs[:args.batch], args, lora, n_params)
            except Exception as err:  # noqa: BLE001 - one failing configuration must not lose the others
                if args.smoke:
                    raise
                r = {"name": name, "lora": lora, "error": repr(err)[:500]}
            results.append(r)
            if "error" in r:
                print(f"  {'LoRA' if lora else 'full'} {name:<9} FAILED {r['error']}", flush=True)
                continue
            print(f"  {describe(r)}", flush=True)
    ratios = {}
    for lora in (False, True):
        ok = {r["name"]: r for r in results if r["lora"] == lora and "error" not in r}
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
    profiled = None
    if args.profile:
        try:
            profiled = run_profile(args.profile, base, tokenizer, pairs, args)
        except Exception as err:  # noqa: BLE001 - the sweep still runs
            if args.smoke:
                raise
            profiled = {"name": args.profile, "error": repr(err)[:500]}
            print(f"  profile {args.profile} FAILED {profiled['error']}", flush=True)
    swept = sweep(base, tokenizer, pairs, args, n_params, sweep_names) if sweep_names else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "device": gpu, "smoke": args.smoke, "settings": {k: str(v) for k, v in vars(args).items()},
        "results": results, "ratios": ratios, "profile": profiled, "sweep": swept,
        "seconds": time.perf_counter() - started,
    }, indent=2))
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")
    print_tables(results, profiled, swept)


def print_tables(results: list[dict], profiled: dict | None, swept: list[dict]) -> None:
    """The short table printed last: each measured step beside its floor, the profile's shares."""
    rows = [(f"{'lora' if r['lora'] else 'full'} {r['name']}" + (f" b{r['batch']}" if "batch" in r else ""), r)
            for r in (*results, *swept)]
    if rows:
        print(f"{'configuration':<22} {'step ms':>9} {'floor ms':>9} {'x floor':>8} {'MFU':>7} {'GiB':>6}")
    for label, r in rows:
        if "median_step_s" not in r:
            what = "out of memory" if r.get("oom") else r.get("stopped") or r.get("error", "")[:60]
            print(f"{label:<22} {what}")
            continue
        fl = f"{r['floor_s'] * 1000:9.1f} {r['x_floor']:8.1f} {r['mfu'] * 100:6.1f}%" if "mfu" in r \
            else f"{'none':>9} {'-':>8} {'-':>7}"
        mem = f"{r['peak_memory_gib']:6.1f}" if r.get("peak_memory_gib") is not None else f"{'-':>6}"
        print(f"{label:<22} {r['median_step_s'] * 1000:9.1f} {fl} {mem}")
    if profiled and "shares" in profiled:
        print(f"profile: {profiled['name']}, full, batch {profiled['batch']}, {profiled['steps']} steps of "
              f"{profiled['step_s'] * 1000:.1f} ms ({profiled['time']}; collation's host time "
              f"{profiled['collate_host_share'] * 100:.1f}% of the step)")
        print(f"{'category':<16} {'share':>7} {'ms/step':>9}")
        for k in CATEGORIES:
            share = profiled["shares"][k]
            print(f"{k:<16} {share * 100:6.1f}% {share * profiled['step_s'] * 1000:9.2f}")


if __name__ == "__main__":
    main()
