"""bench/gpu.sh runs: its --smoke mode (CPU, tiny model, one step per configuration) must produce
every configuration's row, so the script is known to work the day a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_smoke_mode_measures_every_configuration(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the smoke run takes under 30 s: the bound only stops a hang, and no figure is asserted but > 0
    proc = subprocess.run([str(REPO / "bench" / "gpu.sh"), "--smoke", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["name"], r["lora"]): r for r in result["results"]}
    assert set(rows) == {(n, lora) for n in ("trl", "trl_pre", "dpo", "spo_m2", "spo_all", "spo_drop")
                         for lora in (False, True)}
    assert all("error" not in r and r["median_step_s"] > 0 and r["tokens_per_s"] > 0 for r in rows.values())
    assert {"full dpo/trl_pre", "lora spo_m2/dpo", "full spo_all/dpo"} <= set(result["ratios"])


def _bench_gpu():  # noqa: ANN202 - the script, imported as a module (bench/ is not a package)
    import importlib
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    try:
        return importlib.import_module("bench_gpu")
    finally:
        sys.path.remove(str(REPO / "bench"))


def test_categorise_shares_of_hand_made_events() -> None:
    bench = _bench_gpu()
    events = [
        ("aten::mm > sm90_xmma_gemm_bf16bf16", 0.030, ""),
        ("aten::addmm", 0.010, ""),
        ("aten::_scaled_dot_product_efficient_attention > fmha_cutlassF_bf16_aligned", 0.015, ""),
        ("aten::mm > sm90_xmma_gemm_bf16bf16", 0.008, "spo/lm_head_logps"),  # the LM head: its range wins
        ("aten::logsumexp", 0.002, "spo/lm_head_logps"),
        ("aten::index_add_", 0.001, "spo/degree_heads"),
        ("aten::_foreach_mul_", 0.006, "spo/optimizer"),
        ("aten::copy_ > Memcpy HtoD (Pageable -> Device)", 0.001, ""),  # a copy outside the range: still H2D
        ("aten::copy_", 0.001, "spo/collate"),
        ("aten::where", 0.002, "spo/attention_mask"),
        ("aten::mul > elementwise_kernel", 0.004, ""),
    ]
    shares = bench.categorise(events, wall_s=0.100)
    assert list(shares) == list(bench.CATEGORIES)
    expected = {"matmul": 0.40, "attention": 0.17, "lm_head_logps": 0.10, "degree_heads": 0.01, "optimizer": 0.06,
                "collate": 0.02, "other": 0.04, "host_gaps": 0.20}
    assert shares == pytest.approx(expected)
    # events past the wall (overlap): shares of their sum, no negative gap
    over = bench.categorise([("aten::mm", 0.3, ""), ("aten::mul", 0.1, "")], wall_s=0.2)
    assert over == pytest.approx({**dict.fromkeys(bench.CATEGORIES, 0.0), "matmul": 0.75, "other": 0.25})
    assert bench.categorise([], 0.0) == dict.fromkeys(bench.CATEGORIES, 0.0)


def test_profiler_events_put_backward_ops_in_their_forward_range() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    bench = _bench_gpu()
    body, head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        h = body(torch.randn(3, 8))
        with record_function("spo/lm_head_logps"):
            y = head(h).logsumexp(-1)
        y.sum().backward()
    events, _ = bench.profiler_events(prof, cuda=False)
    mm = [scope for name, _, scope in events if name in ("aten::mm", "aten::addmm")]
    # forward: addmm of the body (no range) and of the head; backward: the head's two mm, the body's one or two
    assert mm.count("spo/lm_head_logps") >= 3 and mm.count("") >= 2
    assert all(seconds >= 0 for _, seconds, _ in events)


@pytest.mark.slow
def test_gpu_benchmark_smoke_profile_and_sweep(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(REPO / "bench" / "gpu.sh"), "--smoke", "--profile", "--sweep", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["results"] == []  # with --profile/--sweep the comparison runs only when --configs asks
    profile = result["profile"]
    assert profile["name"] == "dpo" and profile["step_s"] > 0
    shares = profile["shares"]
    assert list(shares) == ["matmul", "attention", "lm_head_logps", "degree_heads", "optimizer", "collate", "other",
                            "host_gaps"]
    assert all(v >= 0 for v in shares.values()) and sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
    assert shares["matmul"] > 0 and shares["lm_head_logps"] > 0 and shares["optimizer"] > 0
    rows = {(r["name"], r["batch"]) for r in result["sweep"] if r.get("median_step_s", 0) > 0}
    assert rows == {(n, b) for n in ("dpo", "spo_m2", "trl_pre") for b in (2, 4)}
    assert all("floor_s" not in r for r in result["sweep"])  # no peak on a CPU: no floor
    table = proc.stdout[proc.stdout.index("configuration"):]
    assert "floor ms" in table and "host_gaps" in table and "full spo_m2 b4" in table
