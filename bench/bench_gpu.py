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

``--smoke``: the same code on CPU with a tiny model, float32, one step per configuration, so CI
proves the script runs; its figures mean nothing.

Writes bench/results/gpu.json (or --out).
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


def run_ours(name: str, base, tokenizer, pairs: list[dict], args: argparse.Namespace, lora: bool) -> dict:  # noqa: ANN001
    from spo.config import DegreeLossConfig, OptimConfig, TrainConfig
    from spo.models.loading import apply_lora
    from spo.training.trainer import PreferenceTrainer

    enabled, mode, levels = OURS[name]
    model = copy.deepcopy(base)
    if lora:
        model = apply_lora(model, lora_cfg())
    total = args.warmup + args.steps
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
    trainer = PreferenceTrainer.from_rows(model, tokenizer, cfg, rows,
                                          [p["degrees"] for p in pairs] if enabled else None, seed=0, progress=False)
    clock = Clock(args.device)
    clock.mark()
    for step in range(1, total + 1):
        trainer.train(stop_after=step)
        clock.mark()
    batch = trainer.data.collator(trainer.data.train_examples, list(range(len(trainer.data.train_examples))), step=1)
    return {"step_times": clock.steps(), "tokens_per_step": batch.n_tokens}


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
    }
    if args.peak:
        out["mfu"] = flops / step / args.peak
    gc.collect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, one step: proves the script runs")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step (one micro-batch)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--no-trl", action="store_true", help="skip TRL (when trl is not installed)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu.json")
    args = parser.parse_args()

    import torch

    if args.smoke:
        args.device, args.steps, args.warmup, args.batch, args.max_length = "cpu", 1, 0, 2, 160
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            sys.exit("no GPU: run with --smoke on a CPU")
        args.device = "cuda"
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    args.peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    args.workdir = os.environ.get("TMPDIR", "/tmp")
    names = [c for c in args.configs.split(",") if c and not (args.no_trl and c.startswith("trl"))]
    started = time.perf_counter()
    base, tokenizer, rows = build(LLAMA_SMOKE if args.smoke else LLAMA_1B, args.device)
    n_params = sum(p.numel() for n, p in base.named_parameters() if "embed_tokens" not in n)
    pairs = pick_pairs(rows, tokenizer, args.batch, args.max_length)
    print(f"{gpu}: Llama {sum(p.numel() for p in base.parameters()) / 1e9:.2f} B parameters "
          f"({n_params / 1e9:.2f} B outside the embedding), {len(pairs)} pairs x <= {args.max_length} tokens, "
          f"{'bf16 autocast' if args.device == 'cuda' else 'float32'}, sdpa", flush=True)
    results = []
    for lora in (False, True):
        for name in names:
            try:
                r = measure(name, base, tokenizer, pairs, args, lora, n_params)
            except Exception as err:  # noqa: BLE001 - one failing configuration must not lose the others
                if args.smoke:
                    raise
                r = {"name": name, "lora": lora, "error": repr(err)[:500]}
            results.append(r)
            if "error" in r:
                print(f"  {'LoRA' if lora else 'full'} {name:<9} FAILED {r['error']}", flush=True)
                continue
            mem = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "-"
            mfu = f"MFU {r['mfu'] * 100:.1f}%" if "mfu" in r else f"{r['tflops']:.2f} TFLOP/s"
            print(f"  {'LoRA' if lora else 'full'} {name:<9} step {r['median_step_s'] * 1000:7.1f} ms  "
                  f"{r['pairs_per_s']:7.1f} pairs/s  {r['tokens_per_s']:9.0f} tok/s  {mfu}  peak {mem}", flush=True)
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "device": gpu, "smoke": args.smoke, "settings": {k: str(v) for k, v in vars(args).items()},
        "results": results, "ratios": ratios, "seconds": time.perf_counter() - started,
    }, indent=2))
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
