"""Preference training step time and peak memory: TRL's DPOTrainer vs our trainer, side by side.

One run measures, on the same tiny random-init Llama (spo.models.tiny, the project defaults:
hidden 256, 4 layers, vocab 4096, ~4.2 M parameters), the same real HH pairs (prompt + response
at most --max-length tokens, 8 pairs per step), full fine-tuning, float32 on CPU:

* trl        TRL ``DPOTrainer`` (loss_type sigmoid, a frozen copy as ref_model, reference
             forward every step, gradient checkpointing off — TRL's DPOConfig default is on)
* dpo        our trainer, DPO, precomputed reference log-probs, batches grouped by length
* spo_m2     DPO + SPO, N = 4, reencode mode, levels_per_step = 2
* spo_all    DPO + SPO, N = 4, reencode mode, all levels
* spo_drop   DPO + SPO, N = 4, drop mode (all levels)
* trl_pre    (only when named in --configs) TRL with precompute_ref_log_probs=True

The 8 pairs are the whole training set (one step per epoch), so every step of every
configuration processes the same batch: medians compare like with like. With a single batch,
grouping by length cannot change the padding; that lever only pays on a full data set.
Every SPO pair has distinct levels on both sides, so the degree loss covers all 16 responses.

Each configuration runs in a fresh subprocess (so its RSS high-water mark, from
``resource.getrusage``, is its own), with the same ``torch.set_num_threads``. Step time is the
wall time between consecutive optimizer-step ends (data collation, forward, backward, optimizer
step), median over --steps steps after --warmup steps; ours is timed around
``PreferenceTrainer.train(stop_after=k)``, one optimizer step per call, TRL between
``on_step_end`` callbacks. One-off costs (tokenisation, reference precompute, TRL's dataset
mapping) are reported apart as "setup". The default run (1 thread, 3 timed steps after 1
warm-up, 5 configurations) takes about 4 minutes on the 2-core VM. One thread per worker is the
default because the VM is shared: with 2 OpenMP threads and another session holding a core,
step times inflated 3-6x and erratically (medians no longer ordered by work).

Usage: python bench/bench_train.py [--steps 3] [--warmup 1] [--threads 1] [--configs trl,dpo,...]
Writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("trl", "dpo", "spo_m2", "spo_all", "spo_drop")
EXTRA = ("trl_pre",)  # not run by default: TRL with precompute_ref_log_probs=True
HH_MARKER = "\n\nAssistant:"
BETA = 0.1
N_LEVELS = 4
LR = 1e-4

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_name, "1")


def shared_data_dir() -> Path:
    env = os.environ.get("SPO_SHARED_DATA")
    for candidate in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if (candidate / "hh" / "train.jsonl.gz").is_file():
            return candidate
    sys.exit("HH sample not found: set SPO_SHARED_DATA to the shared data folder")


def split_hh(row: dict) -> tuple[str, str, str]:
    """(prompt up to and including the last "\\n\\nAssistant:", chosen response, rejected response)."""
    cut = row["chosen"].rfind(HH_MARKER) + len(HH_MARKER)
    return row["chosen"][:cut], row["chosen"][cut:], row["rejected"][cut:]


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# --------------------------------------------------------------------------------------------
# setup (parent): tokenizer, model, the pairs — written once, read by every worker


def prepare(workdir: Path, n_pairs: int, max_length: int, seed: int) -> dict:
    import torch

    from spo.config import TinyModelConfig
    from spo.models.tiny import build_tiny_llama, train_tokenizer

    rows = []
    with gzip.open(shared_data_dir() / "hh" / "train.jsonl.gz", "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    triples = [split_hh(r) for r in rows]
    triples = [t for t in triples if t[1].strip() and t[2].strip() and t[1] != t[2]]
    tokenizer = train_tokenizer([r["chosen"] for r in rows] + [r["rejected"] for r in rows], TinyModelConfig().vocab_size)
    # No chat template: both trainers see the raw HH text + eos, i.e. the same token ids.
    tokenizer.chat_template = None
    from spo.config import KeywordsConfig
    from spo.degrees import build_degree_variants
    from spo.keywords import get_extractor, method_options
    from spo.stages.degrees import _phrases

    kw = KeywordsConfig()
    extractor = get_extractor(kw.method, **method_options(kw))

    def degree_line(index: int, chosen: str, rejected: str) -> dict:
        """What `spo degrees` writes for the row: N = 4 levels per response, rake phrases."""
        line: dict = {"id": str(index), "n_levels": N_LEVELS}
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            entry = {side: [kp.to_json() for kp in extractor.extract(text)]}
            line[side] = build_degree_variants(text, _phrases(entry, side, "bench"), N_LEVELS).to_json()
        return line

    picked = []
    for index, (prompt, chosen, rejected) in enumerate(triples):
        n_prompt = len(tokenizer(prompt)["input_ids"])
        n_c = len(tokenizer(prompt + chosen + tokenizer.eos_token)["input_ids"])
        n_r = len(tokenizer(prompt + rejected + tokenizer.eos_token)["input_ids"])
        if max(n_c, n_r) > max_length or n_prompt < 8:
            continue
        degrees = degree_line(index, chosen, rejected)
        if not (degrees["chosen"]["distinct"] and degrees["rejected"]["distinct"]):
            continue  # every response feeds the degree loss: the SPO rows measure its full cost
        picked.append({"index": index, "prompt": prompt, "chosen": chosen, "rejected": rejected,
                       "tokens": n_c + n_r, "degrees": degrees})
        if len(picked) >= n_pairs:
            break
    if len(picked) < n_pairs:
        sys.exit(f"only {len(picked)} HH pairs fit in {max_length} tokens")
    model = build_tiny_llama(TinyModelConfig(), tokenizer, seed=seed)
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    (workdir / "pairs.json").write_text(json.dumps(picked))
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "pairs": len(picked),
        "tokens_per_pair_mean": statistics.mean(p["tokens"] for p in picked),
        "torch": torch.__version__,
    }


# --------------------------------------------------------------------------------------------
# workers (one fresh process per configuration)


def worker_trl(workdir: Path, args: argparse.Namespace, precompute: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    pairs = json.loads((workdir / "pairs.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    policy = LlamaForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    reference = LlamaForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    dataset = Dataset.from_dict({k: [p[k] for p in pairs] for k in ("prompt", "chosen", "rejected")})
    total = args.warmup + args.steps

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[tuple[float, float]] = []
            self.start = (0.0, 0.0)

        def on_train_begin(self, *a, **k):  # noqa: ANN002, ANN003
            self.start = (time.perf_counter(), time.process_time())

        def on_step_end(self, *a, **k):  # noqa: ANN002, ANN003
            self.ends.append((time.perf_counter(), time.process_time()))

    timer = Timer()
    config = DPOConfig(
        output_dir=str(workdir / "trl_out"), per_device_train_batch_size=args.batch, max_steps=total,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, beta=BETA, loss_type=["sigmoid"],
        max_length=args.max_length, bf16=False, fp16=False, use_cpu=True, activation_checkpointing=args.trl_gc,
        precompute_ref_log_probs=precompute, report_to=[], save_strategy="no", logging_steps=10_000,
        disable_tqdm=True, dataloader_num_workers=0, seed=0, max_grad_norm=1.0,
    )
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[timer])
    setup_s = time.perf_counter() - t0
    rss_before = rss_mib()
    trainer.train()
    starts = [timer.start, *timer.ends[:-1]]
    return {"setup_s": setup_s, "rss_before_train_mib": rss_before,
            "step_times": [b[0] - a[0] for a, b in zip(starts, timer.ends)],
            "step_cpu_times": [b[1] - a[1] for a, b in zip(starts, timer.ends)]}


OURS = {
    # name: (degree loss on, mode, levels_per_step)
    "dpo": (False, "reencode", None),
    "spo_m2": (True, "reencode", 2),
    "spo_all": (True, "reencode", None),
    "spo_drop": (True, "drop", None),
}


def worker_ours(name: str, workdir: Path, args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from spo.config import DegreeLossConfig, OptimConfig, TrainConfig
    from spo.training.trainer import PreferenceTrainer

    pairs = json.loads((workdir / "pairs.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    policy = LlamaForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    enabled, mode, levels = OURS[name]
    total = args.warmup + args.steps
    cfg = TrainConfig(
        loss="dpo", beta=BETA,
        spo=DegreeLossConfig(enabled=enabled, mode=mode, levels_per_step=levels),
        max_length=args.max_length, max_prompt_length=args.max_length - 1,  # the pairs fit: no truncation
        group_by_length=True, precompute_reference=True,
        # one step past the timed ones, so the final evaluate/save of the last step is never timed
        optim=OptimConfig(learning_rate=LR, warmup_steps=0, batch_size=args.batch, micro_batch_size=args.batch,
                          max_steps=total + 1, max_grad_norm=1.0),
        logging_steps=10_000, eval_steps=10_000, save_steps=10_000,
    )
    rows = [{"id": str(p["index"]), "source": "hh", "prompt": p["prompt"], "chosen": p["chosen"],
             "rejected": p["rejected"]} for p in pairs]
    degrees = [p["degrees"] for p in pairs] if enabled else None
    t0 = time.perf_counter()
    trainer = PreferenceTrainer.from_rows(policy, tokenizer, cfg, rows, degrees, seed=0, out_dir=None, progress=False)
    setup_s = time.perf_counter() - t0  # tokenisation + reference precompute (one-off)
    rss_before = rss_mib()
    step_times, step_cpu_times = [], []
    for step in range(1, total + 1):  # one optimizer step per call, the trainer's own loop
        t, c = time.perf_counter(), time.process_time()
        trainer.train(stop_after=step)
        step_times.append(time.perf_counter() - t)
        step_cpu_times.append(time.process_time() - c)
    assert trainer.state.step == total
    return {"setup_s": setup_s, "step_times": step_times, "step_cpu_times": step_cpu_times,
            "rss_before_train_mib": rss_before,
            "reference": trainer.reference.kind, "reference_forwards": trainer.reference.forwards}


def run_worker(name: str, workdir: Path, args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    if name.startswith("trl"):
        result = worker_trl(workdir, args, precompute=name == "trl_pre")
    else:
        result = worker_ours(name, workdir, args)
    steps = result["step_times"][args.warmup:]
    cpu = result["step_cpu_times"][args.warmup:]
    result.update(
        name=name,
        threads=torch.get_num_threads(),
        median_step_s=statistics.median(steps),
        min_step_s=min(steps),
        median_cpu_s=statistics.median(cpu),
        peak_rss_mib=rss_mib(),
        loadavg_1min=[load_before, os.getloadavg()[0]],
    )
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads, the same for all (1: reproducible on the shared 2-core VM)")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=256, help="prompt + response tokens, at most")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, from {', '.join(CONFIGS + EXTRA)} (default: all but {', '.join(EXTRA)})")
    parser.add_argument("--trl-gc", action="store_true", help="TRL with gradient checkpointing (its default)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train.json")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    parser.add_argument("--_workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._worker:
        run_worker(args._worker, args._workdir, args)
        return

    names = [c for c in args.configs.split(",") if c]
    unknown = set(names) - set(CONFIGS) - set(EXTRA)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; choose from {CONFIGS + EXTRA}")
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        workdir = Path(tmp)
        # The same batch every step (the 8 pairs are the whole data set: one step per epoch), so
        # every step of every configuration does the same work and medians compare like with like.
        setup = prepare(workdir, args.batch, args.max_length, seed=0)
        print(f"tiny Llama {setup['parameters'] / 1e6:.2f} M parameters; {setup['pairs']} HH pairs "
              f"(mean {setup['tokens_per_pair_mean']:.0f} tokens per pair, chosen + rejected), "
              f"{args.batch} pairs/step, {args.threads} threads", flush=True)
        results = {}
        for name in names:
            cmd = [sys.executable, __file__, "--_worker", name, "--_workdir", str(workdir),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
                   "--batch", str(args.batch), "--max-length", str(args.max_length)]
            cmd += ["--trl-gc"] if args.trl_gc else []
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"{name}: FAILED (rc {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
                results[name] = {"name": name, "error": proc.stderr[-3000:]}
                continue
            results[name] = json.loads(lines[-1][len("RESULT "):])
            results[name]["process_wall_s"] = time.perf_counter() - t0
            r = results[name]
            print(f"  {name:<9} median step {r['median_step_s'] * 1000:7.0f} ms (min {r['min_step_s'] * 1000:.0f}, "
                  f"CPU {r['median_cpu_s'] * 1000:.0f})   peak RSS {r['peak_rss_mib']:6.0f} MiB   "
                  f"(process {r['process_wall_s']:.0f} s, load {r['loadavg_1min'][0]:.1f}->{r['loadavg_1min'][1]:.1f})",
                  flush=True)

    report(results, setup, args)


def report(results: dict, setup: dict, args: argparse.Namespace) -> None:
    ok = {n: r for n, r in results.items() if "median_step_s" in r}
    print()
    print("| config | median step (ms) | min step (ms) | median CPU time/step (ms) | peak RSS (MiB) | one-off setup (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in ok.items():
        print(f"| {name} | {r['median_step_s'] * 1000:.0f} | {r['min_step_s'] * 1000:.0f} | {r['median_cpu_s'] * 1000:.0f} "
              f"| {r['peak_rss_mib']:.0f} | {r.get('setup_s', float('nan')):.1f} |")
    ratios = {}
    targets = {"dpo/trl": ("dpo", "trl", 1.0), "spo_m2/dpo": ("spo_m2", "dpo", 2.0),
               "spo_all/dpo": ("spo_all", "dpo", None), "spo_drop/dpo": ("spo_drop", "dpo", 1.1)}
    print("\nratios (of median wall step time; min wall and median CPU time in brackets):")
    for label, (num, den, target) in targets.items():
        if num in ok and den in ok:
            value = ok[num]["median_step_s"] / ok[den]["median_step_s"]
            by_min = ok[num]["min_step_s"] / ok[den]["min_step_s"]
            by_cpu = ok[num]["median_cpu_s"] / ok[den]["median_cpu_s"]
            met = None if target is None else value <= target
            ratios[label] = {"value": value, "by_min": by_min, "by_cpu": by_cpu, "target": target, "met": met}
            verdict = "(recorded)" if target is None else f"target <= {target}: {'MET' if met else 'MISSED'}"
            print(f"  {label:<13} {value:5.2f}  [{by_min:.2f}, {by_cpu:.2f}]  {verdict}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "out"},
        "setup": setup, "results": results, "ratios": ratios,
        "command": " ".join([Path(sys.executable).name, "bench/bench_train.py", *sys.argv[1:]]),
    }
    args.out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
