"""The LM head's log-probs with a frozen head (LoRA): the frozen-head path against the recomputing one.

``spo.training.forward.token_logps`` sends a frozen linear head with gradients on through
``FrozenHeadLogps`` (the gradient with respect to the hidden states computed in the forward);
the path it replaced runs the head once per chunk in the forward, keeps or recomputes the float32
logits for the backward, and multiplies again. This measures both side by side in one process on
the same tensors, for one and for several chunks: forward + backward time (median of --repeats)
and the bytes autograd keeps for the backward (counted with ``saved_tensors_hooks``, exact on
any device), plus peak device memory on CUDA.

    .venv/bin/python bench/bench_logps.py            # SmolLM2's head (576 x 49,152) and Llama-3's (4096 x 128,256)
    .venv/bin/python bench/bench_logps.py --quick    # SmolLM2's head only
    .venv/bin/python bench/bench_logps.py --smoke    # a 64 x 1,024 head, seconds (tests/test_bench_logps.py)

Prints a table and writes bench/results/logps.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from spo.training import forward  # noqa: E402

HEADS = {"smollm2": (576, 49152), "llama3": (4096, 128256), "smoke": (64, 1024)}  # (hidden, vocabulary)
SIZES = {"smoke": ((64, 128), (256, 64))}  # (tokens, chunk): one chunk, then four chunks
DEFAULT_SIZES = ((2048, 4096), (8192, 2048))


def saved_bytes(fn: Any) -> tuple[Any, int]:
    """fn()'s result and the bytes of the tensors autograd saved for its backward."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def run(path: str, hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, chunk: int,
        upstream: torch.Tensor) -> dict[str, float]:
    """One forward + backward through ``path`` ("frozen" or "recompute"): seconds, saved bytes, peak."""
    saved_fn = forward._frozen_linear
    forward._frozen_linear = saved_fn if path == "frozen" else (lambda h: False)
    try:
        cuda = hidden.is_cuda
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        started = time.perf_counter()
        hidden.grad = None
        (logps, _), kept = saved_bytes(lambda: forward.token_logps(hidden, targets, head, chunk))
        (logps * upstream).sum().backward()
        if cuda:
            torch.cuda.synchronize()
        out = {"seconds": time.perf_counter() - started, "saved_bytes": kept}
        if cuda:
            out["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        return out
    finally:
        forward._frozen_linear = saved_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="SmolLM2's head only")
    parser.add_argument("--smoke", action="store_true", help="a tiny head and few tokens: proves the script runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "logps.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    names = ("smoke",) if args.smoke else ("smollm2",) if args.quick else ("smollm2", "llama3")
    for name in names:
        d, vocab = HEADS[name]
        torch.manual_seed(0)
        head = torch.nn.Linear(d, vocab, bias=False, device=device, dtype=dtype).requires_grad_(False)
        for tokens, chunk in SIZES.get(name, DEFAULT_SIZES):  # one chunk; four chunks
            hidden = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
            targets = torch.randint(0, vocab, (tokens,), device=device)
            upstream = torch.randn(tokens, device=device)
            for path in ("recompute", "frozen", "recompute", "frozen"):  # warm-up round, then timed
                run(path, hidden, targets, head, chunk, upstream)
            timed: dict[str, list[dict[str, float]]] = {"recompute": [], "frozen": []}
            for _ in range(args.repeats):  # interleaved: a load change hits both alike
                for path in timed:
                    timed[path].append(run(path, hidden, targets, head, chunk, upstream))
            row: dict[str, Any] = {"head": name, "hidden": d, "vocab": vocab, "tokens": tokens, "chunk": chunk}
            for path, results in timed.items():
                row[f"{path}_s"] = statistics.median(r["seconds"] for r in results)
                row[f"{path}_saved_mib"] = results[0]["saved_bytes"] / 2**20
                if "peak_bytes" in results[0]:
                    row[f"{path}_peak_mib"] = max(r["peak_bytes"] for r in results) / 2**20
            row["time_ratio"] = row["frozen_s"] / row["recompute_s"]
            rows.append(row)
            print(f"{name:<8} {tokens:>5} tokens, chunk {chunk}: recompute {row['recompute_s'] * 1000:8.1f} ms "
                  f"(keeps {row['recompute_saved_mib']:7.1f} MiB)  frozen {row['frozen_s'] * 1000:8.1f} ms "
                  f"(keeps {row['frozen_saved_mib']:6.1f} MiB)  time x{row['time_ratio']:.2f}", flush=True)
            del hidden
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                    "dtype": str(dtype), "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
