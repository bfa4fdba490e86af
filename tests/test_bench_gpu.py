"""bench/gpu.sh runs: its --smoke mode (CPU, tiny model, one step per configuration) must produce
every configuration's row, so the script is known to work the day a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def smoke(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    """``bench/gpu.sh --smoke FLAGS`` with one thread; its stdout and JSON. A smoke run takes under a
    minute (the compiled layers' first compilation included): the 600 s bound only stops a hang."""
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(REPO / "bench" / "gpu.sh"), "--smoke", *flags, "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_gpu_benchmark_smoke_mode_measures_every_configuration(tmp_path: Path) -> None:
    _, result = smoke(tmp_path)  # no figure is asserted but > 0
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
    proc, result = smoke(tmp_path, "--profile", "--sweep")
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


@pytest.mark.slow
def test_gpu_benchmark_smoke_check_and_ablation(tmp_path: Path) -> None:
    """--check compares each speed path's step with the default's (float32 on a CPU: all equal, flex
    falling back to the dense mask, said so); --ablation measures each option, SPO with the fastest
    kept combination and TRL, and gives the issue's targets as PASS/FAIL/n/a."""
    proc, result = smoke(tmp_path, "--check", "--ablation")
    assert result["results"] == []  # with --check/--ablation the comparison runs only when --configs asks
    check = result["check"]
    rows = {r["check"]: r for r in check["rows"]}
    assert set(rows) == {"repeat", "fused", "flex", "compile", "frozen_head"}
    assert check["precision"] == "float32"
    for name, r in rows.items():
        assert r["passed"], (name, r)
        assert {"logps", "loss", "grads", "params"} <= set(r) and r["params"]["rel_l2"] <= r["params"]["limit"]
    assert rows["frozen_head"]["lora"] and not rows["compile"]["lora"]
    assert "falls back" in rows["flex"]["note"] and rows["flex"]["attention"] == "sdpa"
    assert check["passed"] == {"fused": True, "flex": True, "compile": True, "frozen_head": True}
    ablation = result["ablation"]
    labels = [r["label"] for r in ablation["rows"]]
    best = ablation["best"]
    assert labels == ["baseline", "+fused", "+flex", "+compile", "+all", f"spo_m2 ({best})", f"spo_all ({best})",
                      "trl_pre"]
    assert all(r["median_step_s"] > 0 and r["batch"] == 2 for r in ablation["rows"])
    assert all(r["status"] == "kept" for r in ablation["rows"][1:5])
    by_label = {r["label"]: r for r in ablation["rows"]}
    assert by_label["+all"]["options"] == ["fused", "flex", "compile"]
    assert by_label["+compile"]["settings"] == {"compile": True, "pad_to_multiple_of": 64}
    assert by_label[f"spo_m2 ({best})"]["options"] == by_label[best]["options"]
    verdicts = {v["target"]: v["verdict"] for v in ablation["verdicts"]}
    assert list(verdicts) == ["ours dpo MFU >= 40%", "spo_m2/dpo step <= 1.10", "spo_all/dpo step <= 1.25",
                              "dpo/trl_pre step <= 0.40", "peak memory of ours <= TRL's"]
    assert verdicts["ours dpo MFU >= 40%"] == "n/a" and verdicts["peak memory of ours <= TRL's"] == "n/a"  # a CPU
    assert all(verdicts[k] in ("PASS", "FAIL") for k in list(verdicts)[1:4])
    table = proc.stdout[proc.stdout.index("check (float32"):]
    assert "frozen_head" in table and "ablation: ours dpo" in table and "spo_all/dpo step <= 1.25" in table


@pytest.mark.slow
def test_gpu_benchmark_smoke_llama8b(tmp_path: Path) -> None:
    """--model llama8b's code path on a tiny shape: bf16 weights, GQA, an embedding larger than the
    tokenizer, LoRA for dpo/spo_m2/trl_pre, then full fine-tuning (where it fits) with checkpointing."""
    proc, result = smoke(tmp_path, "--model", "llama8b")
    assert result["model"] == "llama8b" and result["weights_dtype"] == "bfloat16"
    shape = result["shape"]
    assert shape["num_key_value_heads"] < shape["num_attention_heads"] and shape["vocab_size"] > result["tokenizer_ids"]
    rows = {(r["name"], r["lora"]): r for r in result["results"]}
    assert set(rows) == {("dpo", True), ("spo_m2", True), ("trl_pre", True)}
    assert all(r["median_step_s"] > 0 for r in rows.values())
    full = result["full_fine_tuning"]
    assert full["median_step_s"] > 0 and not full["lora"] and full["estimate_gib"] < full["device_gib"]
    assert full["settings"] == {"optimizer": "adamw_torch_fused", "activation_checkpointing": True}
    assert "full dpo (checkpointing, fused)" in proc.stdout


def test_check_compare_passes_equal_steps_and_fails_a_different_one() -> None:
    import torch

    bench = _bench_gpu()
    tol = bench.TOLERANCES["bf16"]
    ref = {"names": ["w", "b"], "logps": torch.tensor([-200.0, -300.0], dtype=torch.float64), "loss": 0.693,
           "grads": [torch.ones(4, 4), torch.ones(4)], "updates": [torch.full((4, 4), 1e-4), torch.full((4,), -1e-4)]}
    same = bench.compare(ref, {**ref, "logps": ref["logps"] * (1 + 1e-3)}, tol)
    assert same["passed"] and same["logps"]["max_rel"] == pytest.approx(1e-3)
    assert same["params"]["max_abs_in_lr"] == 0.0
    flipped = [torch.full((4, 4), 1e-4), torch.full((4,), 1e-4)]  # four updates of sign flipped: rel-L2 0.89
    off = bench.compare(ref, {**ref, "logps": ref["logps"] * 1.05, "updates": flipped}, tol)
    assert not off["passed"] and not off["logps"]["ok"] and off["loss"]["ok"] and not off["params"]["ok"]
    assert off["params"]["max_abs_in_lr"] == pytest.approx(2.0)
    # a difference within twice the default path's own (the repeat row) passes
    repeat = {"grads": {"rel_l2": 0.0}, "params": {"rel_l2": 0.5}}
    assert bench.compare(ref, {**ref, "updates": flipped}, tol, repeat)["params"]["ok"]
    line = bench.check_line({"check": "flex", "lora": False, **off})
    assert "FAIL" in line and line.startswith("flex")
    assert not bench.compare(ref, {**ref, "names": ["w"]}, tol)["passed"]


def test_ablation_keeps_only_equal_options_and_gives_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    """An option whose check failed is measured but not kept, even when fastest; SPO rows take the
    fastest kept combination; the verdicts read the rows."""
    import argparse

    bench = _bench_gpu()
    speed = {"fused": 0.9, "flex": 0.5, "compile": 0.8}
    base_step = {"dpo": 1.0, "spo_m2": 1.05, "spo_all": 1.4, "trl_pre": 3.0}
    measured = []

    def fake_measure(name, base, tokenizer, pairs, args, lora, n_params, options=(), extra=None, consume=False):  # noqa: ANN001, ANN202
        measured.append((name, tuple(options)))
        step = base_step[name]
        for o in options:
            step *= speed[o]
        return {"name": name, "lora": lora, "median_step_s": step, "pairs_per_s": 4 / step, "tokens_per_s": 1e3 / step,
                "peak_memory_gib": 30.0 if name == "trl_pre" else 20.0, **bench.floor(0.5, step, 1.0)}

    monkeypatch.setattr(bench, "measure", fake_measure)
    args = argparse.Namespace(tuning="full", ablation_batch=4, ablation_budget=1e9, deadline=float("inf"),
                              no_trl=False, smoke=False, device="cuda")
    check = {"passed": {"fused": True, "flex": False, "compile": True, "frozen_head": True}}
    result = bench.run_ablation(None, None, [{}] * 4, args, 10, check)
    rows = {r["label"]: r for r in result["rows"]}
    assert rows["+flex"]["status"] == "not kept: not equal" and "+all" not in rows
    assert rows["+all kept (fused+compile)"]["options"] == ["fused", "compile"]
    assert result["best"] == "+all kept (fused+compile)"  # +flex is faster, but not equal
    assert ("spo_m2", ("fused", "compile")) in measured and ("trl_pre", ()) in measured
    verdicts = {v["target"]: (v["verdict"], v["value"]) for v in result["verdicts"]}
    assert verdicts["ours dpo MFU >= 40%"] == ("PASS", pytest.approx(0.5 / 0.72))
    assert verdicts["spo_m2/dpo step <= 1.10"] == ("PASS", pytest.approx(1.05))
    assert verdicts["spo_all/dpo step <= 1.25"][0] == "FAIL"
    assert verdicts["dpo/trl_pre step <= 0.40"] == ("PASS", pytest.approx(0.72 / 3.0))
    assert verdicts["peak memory of ours <= TRL's"][0] == "PASS"
    assert bench.option_status("flex", None).startswith("kept (unchecked")


def test_full_fine_tuning_row_says_what_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    import torch

    bench = _bench_gpu()
    monkeypatch.setattr(bench, "memory_total_gib", lambda device: 80.0)
    big = torch.nn.Module()
    big.p = torch.nn.Parameter(torch.empty(0))
    monkeypatch.setattr(big, "parameters", lambda: iter([torch.empty(8_030_000_000, device="meta")]))
    args = argparse.Namespace(device="cuda", gpu="NVIDIA H100 80GB HBM3", deadline=float("inf"), smoke=False)
    row = bench.full_fine_tuning_row(big, None, [], args, 7_500_000_000)
    assert row["skipped"].startswith("does not fit: 119.7 GiB needed") and "median_step_s" not in row
