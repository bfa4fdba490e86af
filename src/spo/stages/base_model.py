"""Stage ``base_model``: make ``models/base/`` the one place later stages start from.

* ``model.name_or_path: tiny`` — train a byte-level BPE tokenizer on the train split of
  ``base_model.text_dir`` (prompt, chosen and rejected of each row, at most
  ``model.tiny.tokenizer_max_rows`` rows) and build a random-init small Llama with
  ``seed``; both are saved (safetensors) to ``base_model.out_dir``.  Fully offline.
* a hub id or a local folder — resolved, not copied: the tokenizer and ``config.json`` are
  saved to ``out_dir`` and ``base_model.json`` records where the weights are
  (``weights.name_or_path``, the requested revision and the resolved commit).  Copying
  multi-GB weights into the DVC cache would buy nothing the pinned revision does not;
  :func:`spo.models.loading.load_causal_lm` follows the record, so ``models/base`` loads
  the same way in both cases.
* a GGUF file — a ``.gguf`` path or a packaged name such as ``smollm2-135m-instruct`` (see
  :mod:`spo.models.gguf`) — **converted once** into an ordinary folder: the weights
  de-quantised into ``model.dtype`` and saved as safetensors, with ``config.json``,
  ``generation_config.json`` and the tokenizer (chat template included) read from the file;
  ``weights.stored`` is true and later stages load ``out_dir`` like any saved model, without
  touching the GGUF again.  The architecture is checked before anything is loaded.  The
  record's ``gguf`` entry and the provenance give the file's sha256 and size (and the
  package name and version when it came from one).

``base_model.json`` (name, parameter count, model config, tokenizer vocabulary size) is written
in every case, with a provenance record.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from spo.config import SpoConfig
from spo.errors import InputError
from spo.io import read_jsonl, tree_sha256, write_json, write_provenance
from spo.models.gguf import GgufRef, load_gguf_model, load_gguf_tokenizer, resolve_gguf
from spo.models.loading import POINTER_FILE, ensure_pad_token, load_tokenizer, resolve_ref, save_model

log = logging.getLogger("spo.base_model")


def _tiny_texts(text_dir: Path, max_rows: int | None) -> tuple[list[str], Path, int]:
    train = text_dir / "train.jsonl"
    if not train.is_file():
        raise InputError(f"{train}: train split not found (run prepare and validate first)")
    rows = read_jsonl(train)
    if max_rows is not None:
        rows = rows[:max_rows]
    texts = []
    for line_no, row in enumerate(rows, start=1):
        for field in ("prompt", "chosen", "rejected"):
            value = row.get(field)
            if not isinstance(value, str):
                raise InputError(f"{train}:{line_no}: field {field!r} is missing or not a string")
            texts.append(value)
    if not texts:
        raise InputError(f"{train}: no rows to train the tiny tokenizer on")
    return texts, train, len(rows)


def _build_tiny(cfg: SpoConfig, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from spo.models.tiny import build_tiny_llama, train_tokenizer

    texts, train_file, n_rows = _tiny_texts(Path(cfg.base_model.text_dir), cfg.model.tiny.tokenizer_max_rows)
    tokenizer = train_tokenizer(texts, cfg.model.tiny.vocab_size)
    model = build_tiny_llama(cfg.model.tiny, tokenizer, seed=cfg.seed)
    save_model(model, tokenizer, out_dir)
    record = {
        "name": "tiny",
        "params": sum(p.numel() for p in model.parameters()),
        "config": model.config.to_diff_dict(),
        "tokenizer_vocab_size": len(tokenizer),
        "tokenizer_rows": n_rows,
        "weights": {"name_or_path": str(out_dir), "revision": None, "stored": True},
    }
    return record, {"text": {str(train_file): tree_sha256(train_file)[train_file.name]}}


def _resolve_pretrained(cfg: SpoConfig, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    ref, is_local = resolve_ref(cfg.model.name_or_path)
    revision = None if is_local else cfg.model.revision
    tokenizer = load_tokenizer(ref, revision=revision, trust_remote_code=cfg.model.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(ref, revision=revision, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise InputError(f"{ref}: cannot load the model config: {err}") from None
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
        n_params: int | None = sum(p.numel() for p in skeleton.parameters())
    except Exception as err:  # noqa: BLE001 - the count is informative only
        log.warning("could not count the parameters of %s: %s", ref, err)
        n_params = None
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    config.save_pretrained(str(out_dir))
    weights_ref = str(Path(ref).resolve()) if is_local else ref
    record = {
        "name": cfg.model.name_or_path,
        "params": n_params,
        "config": config.to_diff_dict(),
        "tokenizer_vocab_size": len(tokenizer),
        "weights": {
            "name_or_path": weights_ref,
            "revision": revision,
            "commit": getattr(config, "_commit_hash", None),
            "stored": False,
        },
    }
    inputs = {"model": {"name_or_path": weights_ref, "revision": revision, "commit": record["weights"]["commit"]}}
    if is_local:
        inputs["model"]["files"] = tree_sha256(ref)
    return record, inputs


def _convert_gguf(cfg: SpoConfig, out_dir: Path, gguf: GgufRef) -> tuple[dict[str, Any], dict[str, Any]]:
    source = gguf.provenance()  # sha256 and architecture check, before the expensive load
    log.info("base_model: converting GGUF %s (%s, %.1f MB, sha256 %s) to %s in %s",
             gguf.name, source["architecture"], source["size_bytes"] / 1e6, source["sha256"][:12],
             out_dir, cfg.model.dtype)
    tokenizer = ensure_pad_token(load_gguf_tokenizer(gguf), source=str(gguf.path))
    if tokenizer.chat_template is None:
        log.warning("%s: the GGUF file has no chat template; prompts will be formatted raw", gguf.path)
    model = load_gguf_model(gguf, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation)
    for config in (model.config, model.generation_config):  # a file without a padding token id
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
    save_model(model, tokenizer, out_dir)
    record = {
        "name": cfg.model.name_or_path,
        "params": sum(p.numel() for p in model.parameters()),
        "config": model.config.to_diff_dict(),
        "tokenizer_vocab_size": len(tokenizer),
        "weights": {"name_or_path": str(out_dir), "revision": None, "stored": True,
                    "dtype": str(model.dtype).removeprefix("torch.")},
        "gguf": source,
    }
    return record, {"model": source}


def run(cfg: SpoConfig) -> dict[str, Any]:
    """Build, convert or resolve the base model by the kind of ``model.name_or_path``, then write the
    one record (``base_model.json``) later stages load it by, whichever kind it was."""
    started = time.perf_counter()
    out_dir = Path(cfg.base_model.out_dir)
    gguf = resolve_gguf(cfg.model.name_or_path) if cfg.model.name_or_path != "tiny" else None
    if cfg.model.name_or_path == "tiny":
        record, inputs = _build_tiny(cfg, out_dir)
    elif gguf is not None:
        record, inputs = _convert_gguf(cfg, out_dir, gguf)
    else:
        record, inputs = _resolve_pretrained(cfg, out_dir)
    write_json(out_dir / POINTER_FILE, record)
    write_provenance(out_dir, stage="base_model", config_hash=cfg.section_hash("model", "base_model"), inputs=inputs)
    seconds = round(time.perf_counter() - started, 2)
    params = f"{record['params']:,}" if record["params"] is not None else "?"
    log.info(
        "base_model: %s, %s params, vocab %d -> %s (%s) in %.1fs",
        record["name"], params, record["tokenizer_vocab_size"], out_dir,
        "weights stored" if record["weights"]["stored"] else f"weights at {record['weights']['name_or_path']}",
        seconds,
    )
    return {"name": record["name"], "params": record["params"], "out_dir": str(out_dir),
            "tokenizer_vocab_size": record["tokenizer_vocab_size"], "seconds": seconds}
