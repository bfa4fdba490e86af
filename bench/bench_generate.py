"""Generation throughput (generated tokens per second) of spo.generation on the tiny Llama.

Same 32 test prompts (formatted with the model's chat template, at most --max-prompt-length
tokens), greedy decoding, --max-new-tokens new tokens, KV cache on, float32 on CPU, at batch
size 1 and at the configured batch size (generate.batch_size, 8). The model is
/tmp/demo/models/sft when it exists (a trained tiny model: its replies end at eos, so rows of a
batch finish at different lengths, as in real use), else a random-init tiny Llama with the
project's default dimensions (which rarely emits eos: every row runs to max_new_tokens).
Prompts come from /tmp/demo/data/validated/test.jsonl, else from the HH sample in
../shared/data. Each setting runs --repeats times after one warm-up batch; the best and median
wall times are reported.

Usage: python bench/bench_generate.py [--prompts 32] [--max-new-tokens 64] [--threads 1] [--repeats 2]
Writes bench/results/generate.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = Path("/tmp/demo")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_name, "1")


def _rows(limit: int) -> tuple[list[dict], str]:
    demo = DEMO / "data" / "validated" / "test.jsonl"
    if demo.is_file():
        rows = [json.loads(line) for line in demo.read_text(encoding="utf-8").splitlines() if line.strip()]
        return rows[:limit], str(demo)
    sample = REPO.parent / "shared" / "data" / "hh" / "test.jsonl.gz"
    rows = []
    with gzip.open(sample, "rt", encoding="utf-8") as handle:
        for line in handle:
            raw = json.loads(line)
            prompt = raw["chosen"].rsplit("\n\nAssistant:", 1)[0] + "\n\nAssistant:"
            rows.append({"prompt": prompt, "source": "hh"})
            if len(rows) >= limit:
                break
    return rows, str(sample)


def _model(rows: list[dict]):
    from spo.config import SpoConfig
    from spo.models.loading import load_tokenizer, load_trained

    cfg = SpoConfig()
    demo = DEMO / "models" / "sft"
    if demo.is_dir():
        return load_trained(demo, cfg.model), load_tokenizer(demo), str(demo)
    from spo.models.tiny import build_tiny_llama, train_tokenizer

    tokenizer = train_tokenizer([r["prompt"] for r in rows] * 4, cfg.model.tiny.vocab_size)
    model = build_tiny_llama(cfg.model.tiny, tokenizer, seed=0).eval()
    return model, tokenizer, "random-init tiny Llama (project default dims)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-length", type=int, default=None, help="default: generate.max_prompt_length")
    parser.add_argument("--batch-sizes", default=None, help="comma list; default: 1 and generate.batch_size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "generate.json"))
    args = parser.parse_args()

    import torch

    from spo.config import SamplingConfig, SpoConfig
    from spo.generation import encode_prompts, generate_texts

    torch.set_num_threads(args.threads)
    gen_cfg = SpoConfig().generate
    max_prompt_length = args.max_prompt_length or gen_cfg.max_prompt_length
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [1, gen_cfg.batch_size]
    rows, rows_source = _rows(args.prompts)
    model, tokenizer, model_source = _model(rows)
    n_params = sum(p.numel() for p in model.parameters())
    prompts = encode_prompts(tokenizer, rows, max_prompt_length)  # template head kept, oldest content cut
    prompt_tokens = [len(p.ids) for p in prompts]
    sampling = SamplingConfig(do_sample=False, max_new_tokens=args.max_new_tokens)

    results = []
    reference = None
    for bs in batch_sizes:
        generate_texts(model, tokenizer, prompts[:bs], sampling, batch_size=bs, progress=False)  # warm-up
        runs = []
        for _ in range(args.repeats):
            result = generate_texts(model, tokenizer, prompts, sampling, batch_size=bs, progress=False)
            runs.append(result)
        seconds = [r.seconds for r in runs]
        tokens = runs[0].generated_tokens
        same_text = reference is None or runs[0].texts == reference
        reference = reference or runs[0].texts
        results.append({
            "batch_size": bs,
            "generated_tokens": tokens,
            "seconds_best": round(min(seconds), 3),
            "seconds_median": round(statistics.median(seconds), 3),
            "tokens_per_second_best": round(tokens / min(seconds), 1),
            "tokens_per_second_median": round(tokens / statistics.median(seconds), 1),
            "batches": runs[0].meta["batches"],
            "texts_equal_batch_size_1": same_text,
        })
    base = results[0]["tokens_per_second_median"]
    for r in results:
        r["speedup_vs_first"] = round(r["tokens_per_second_median"] / base, 2) if base else None

    print(f"model: {model_source} ({n_params / 1e6:.1f} M params), prompts: {len(prompts)} from {rows_source}")
    print(f"prompt tokens: mean {statistics.mean(prompt_tokens):.0f}, max {max(prompt_tokens)}; "
          f"greedy, max_new_tokens {args.max_new_tokens}, {args.threads} thread(s), float32 CPU")
    print(f"{'batch':>5} {'tokens':>7} {'s (best)':>9} {'s (median)':>11} {'tok/s (median)':>15} {'speedup':>8} "
          f"{'same text':>9}")
    for r in results:
        print(f"{r['batch_size']:>5} {r['generated_tokens']:>7} {r['seconds_best']:>9.2f} "
              f"{r['seconds_median']:>11.2f} {r['tokens_per_second_median']:>15.1f} {r['speedup_vs_first']:>8.2f} "
              f"{str(r['texts_equal_batch_size_1']):>9}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": model_source, "params": n_params, "prompts": len(prompts), "prompts_source": rows_source,
        "prompt_tokens_mean": statistics.mean(prompt_tokens), "prompt_tokens_max": max(prompt_tokens),
        "max_new_tokens": args.max_new_tokens, "max_prompt_length": max_prompt_length, "greedy": True,
        "threads": args.threads, "repeats": args.repeats, "results": results,
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                    "cpus": os.cpu_count()},
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
