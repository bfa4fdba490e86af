"""Loading, LoRA-wrapping and saving models and tokenizers.

A model reference is a local folder, a hub id (``org/name``), or a GGUF file: a ``.gguf`` path
or a packaged name such as ``smollm2-135m-instruct`` (see :mod:`spo.models.gguf`; loaded
de-quantised, architecture checked before any weight is read).  A local path that does not
exist and does not look like a hub id, or a hub id that cannot be resolved (offline, private,
misspelt), is an :class:`~spo.errors.InputError` naming it — never a long traceback from deep inside
transformers.

Pad token: training batches and generation need one.  A tokenizer without a pad token gets the
eos token as pad (the usual choice for Llama-style models) and a WARNING says so; with no eos
either, the unk token, and with neither an InputError.  Because pad may then equal eos, code
that builds labels must mask padding by the attention mask, never by ``pad_token_id`` (that
would also mask the real eos that ends each response).

Saved outputs are always safetensors: a LoRA model saves only its adapter
(``adapter_config.json`` + ``adapter_model.safetensors``) whose ``base_model_name_or_path`` is
the reference the base was loaded from; a full model saves all weights.  The tokenizer is saved
beside either, and :func:`load_trained` reads both kinds back.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from spo.config import LoraConfig, ModelConfig
from spo.errors import InputError
from spo.models.gguf import load_gguf_model, load_gguf_tokenizer, resolve_gguf

log = logging.getLogger("spo.models")

ADAPTER_CONFIG = "adapter_config.json"
POINTER_FILE = "base_model.json"
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def is_hub_id(ref: str) -> bool:
    """``org/name`` or ``name`` with hub-legal characters, and no path syntax (./, /, ~, ..)."""
    return bool(_HUB_ID.match(ref)) and ".." not in ref and not ref.endswith(".")


def resolve_ref(ref: str | Path, what: str = "model") -> tuple[str, bool]:
    """``(reference, is_local)``: an existing folder, a GGUF file (a ``.gguf`` path or a packaged
    name, returned as the file's path, its architecture checked), or a plausible hub id; else
    InputError."""
    text = str(ref)
    path = Path(text).expanduser()
    gguf = resolve_gguf(text)
    if gguf is not None:
        return str(gguf.path), True
    if path.exists():
        if not path.is_dir():
            raise InputError(
                f"{path}: {what} path is a file, expected a folder saved with save_pretrained (or a .gguf file)"
            )
        return str(path), True
    if text == "tiny":
        raise InputError(
            "model 'tiny' is built by the base_model stage; load it from its output folder "
            "(base_model.out_dir, default models/base) instead"
        )
    if is_hub_id(text):
        return text, False
    raise InputError(f"{text}: {what} path does not exist (and is not a hub id of the form org/name)")


def _load_errors() -> tuple[type[BaseException], ...]:
    """What a missing, truncated or garbled model file raises (a truncated safetensors file is a
    SafetensorError, a garbled torch pickle an UnpicklingError or EOFError): a user's file, not a bug."""
    import pickle

    from safetensors import SafetensorError

    return OSError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError


def _from_pretrained(loader: Any, ref: str, is_local: bool, what: str, **kwargs: Any) -> Any:
    try:
        return loader(ref, **kwargs)
    except _load_errors() as err:
        where = "local folder" if is_local else "hub id (offline, private, misspelt or missing revision?)"
        raise InputError(f"{ref}: cannot load {what} from this {where}: {err}") from None


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, source: str = "tokenizer") -> PreTrainedTokenizerBase:
    """Give a tokenizer without pad token one (eos, else unk), with a WARNING; see the module doc."""
    if tokenizer.pad_token is not None:
        return tokenizer
    for name in ("eos_token", "unk_token"):
        token = getattr(tokenizer, name)
        if token is not None:
            tokenizer.pad_token = token
            log.warning("%s has no pad token; using its %s %r as pad (mask padding by attention mask)",
                        source, name[:-6], token)
            return tokenizer
    raise InputError(f"{source}: tokenizer has no pad, eos or unk token to pad with")


def load_tokenizer(
    path: str | Path, *, revision: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a folder, a GGUF file or a hub id; InputError naming the path when
    it is missing."""
    gguf = resolve_gguf(path)
    if gguf is not None:
        return ensure_pad_token(load_gguf_tokenizer(gguf), source=str(gguf.path))
    ref, is_local = resolve_ref(path, "tokenizer")
    tokenizer = _from_pretrained(
        AutoTokenizer.from_pretrained, ref, is_local, "a tokenizer",
        revision=None if is_local else revision, trust_remote_code=trust_remote_code,
    )
    return ensure_pad_token(tokenizer, source=ref)


def has_weights(folder: str | Path) -> bool:
    return any(any(Path(folder).glob(pattern)) for pattern in _WEIGHT_GLOBS)


def weights_pointer(folder: str | Path) -> tuple[str, str | None] | None:
    """``(reference, revision)`` when ``folder`` is a base_model output recording where the
    weights live (a hub id or another folder) instead of holding them; None otherwise."""
    folder = Path(folder)
    pointer = folder / POINTER_FILE
    if has_weights(folder) or not pointer.is_file():
        return None
    try:
        record = json.loads(pointer.read_text(encoding="utf-8"))
        return str(record["weights"]["name_or_path"]), record["weights"].get("revision")
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{pointer}: no weights.name_or_path in the base model record ({err})") from None


def load_causal_lm(path_or_id: str | Path, model_cfg: ModelConfig, *, trainable: bool = True) -> PreTrainedModel:
    """A causal LM with dtype, attention implementation, revision and remote-code policy from params.

    A ``base_model`` output folder without weights (a hub model resolved but not copied) is
    followed to the reference and revision it records.  ``trainable=False`` returns the model
    in eval mode with gradients off (reference models, generation).  A GGUF reference is
    de-quantised into ``model_cfg.dtype`` on every call — the base_model stage converts it once
    into a folder, which is what later stages load.
    """
    gguf = resolve_gguf(path_or_id)
    if gguf is not None:
        model = load_gguf_model(gguf, dtype=model_cfg.dtype, attn_implementation=model_cfg.attn_implementation)
        return _set_trainable(model, trainable)
    ref, is_local = resolve_ref(path_or_id)
    pointer = weights_pointer(ref) if is_local else None
    if pointer is not None:
        target, revision = pointer
        return load_causal_lm(target, model_cfg.model_copy(update={"revision": revision}), trainable=trainable)
    model = _from_pretrained(
        AutoModelForCausalLM.from_pretrained, ref, is_local, "a causal LM",
        dtype=_DTYPES[model_cfg.dtype],
        attn_implementation=model_cfg.attn_implementation,
        revision=None if is_local else model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    return _set_trainable(model, trainable)


def _set_trainable(model: Any, trainable: bool) -> Any:
    """Train mode with every parameter trainable, or eval mode with none. Setting requires_grad
    explicitly matters: a LoRA model merged into its frozen base has no trainable parameter left."""
    if trainable:
        model.train()
        model.requires_grad_(True)
    else:
        model.eval()
        model.requires_grad_(False)
    return model


def lora_targets(model: torch.nn.Module, wanted: list[str]) -> list[str]:
    """The names in ``wanted`` that are the last component of some Linear module of ``model``."""
    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    return [name for name in wanted if name in present]


def apply_lora(model: PreTrainedModel, lora_cfg: LoraConfig, seed: int | None = None) -> Any:
    """Wrap ``model`` in peft LoRA adapters (CAUSAL_LM); base weights are frozen.

    Only target modules present in the model are used (others are logged); none present is an
    InputError listing the Linear module names the model has. ``seed``: initialise the adapters
    from their own generator (the global one untouched), so that the same seed gives the same
    adapters whatever ran before — and every process of a distributed run the same ones.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora_targets(model, lora_cfg.target_modules)
    missing = [t for t in lora_cfg.target_modules if t not in targets]
    if not targets:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise InputError(f"lora.target_modules {lora_cfg.target_modules} match no Linear module; "
                         f"the model has {linear}")
    if missing:
        log.info("LoRA targets not in this model, skipped: %s", missing)
    peft_cfg = PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    if seed is None:
        return get_peft_model(model, peft_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, peft_cfg)


def is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def save_model(model: Any, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | Path,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save the adapter (peft model) or the full weights, as safetensors, plus the tokenizer.

    ``state_dict``: the weights to write instead of the model's own (a sharded run's gathered
    full state; the model then only gives the architecture and config)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_peft_model(model):
        model.save_pretrained(str(out), safe_serialization=True, state_dict=state_dict)
    else:
        model.save_pretrained(str(out), state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def adapter_base(path: str | Path) -> str | None:
    """The base reference recorded in an adapter folder, or None for a full-model folder."""
    config_file = Path(path) / ADAPTER_CONFIG
    if not config_file.is_file():
        return None
    try:
        base = json.loads(config_file.read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (json.JSONDecodeError, KeyError) as err:
        raise InputError(f"{config_file}: unreadable adapter config ({err})") from None
    if not base:
        raise InputError(f"{config_file}: base_model_name_or_path is empty")
    return str(base)


def load_trained(
    path: str | Path,
    model_cfg: ModelConfig,
    *,
    trainable: bool = False,
    merge: bool = False,
    base: str | Path | None = None,
) -> Any:
    """Load what :func:`save_model` wrote: a full model folder, or a LoRA adapter on its base.

    The adapter's base is ``base`` if given, else ``base_model_name_or_path`` from
    ``adapter_config.json``, tried as written (relative to the working directory, as stages
    run), then relative to the adapter folder, then as a hub id.  ``trainable`` keeps the
    adapter weights trainable; ``merge`` folds the adapter into the base and returns a plain
    model (e.g. a frozen reference, or a base for fresh adapters).
    """
    ref, _ = resolve_ref(path)
    recorded = adapter_base(ref)
    if recorded is None:
        return load_causal_lm(ref, model_cfg, trainable=trainable)
    from peft import PeftModel

    base_ref = str(base) if base is not None else recorded
    if base is None and not Path(base_ref).exists() and (Path(ref) / base_ref).exists():
        base_ref = str(Path(ref) / base_ref)
    base_lm = load_causal_lm(base_ref, model_cfg, trainable=False)
    try:
        # Any: merge_and_unload is the LoRA tuner's, reached through PeftModel.__getattr__, which
        # mypy reads as nn.Module's (Tensor | Module)
        model: Any = PeftModel.from_pretrained(base_lm, ref, is_trainable=trainable and not merge)
    except _load_errors() as err:
        raise InputError(f"{ref}: cannot load the LoRA adapter on {base_ref}: {err}") from None
    if merge:
        model = model.merge_and_unload()
        return _set_trainable(model, trainable)
    if not trainable:
        model.eval()
    return model
