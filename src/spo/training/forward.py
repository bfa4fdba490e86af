"""The concatenated forward: one pass of the decoder over a packed batch (spo.training.data).

:class:`SPOModule` holds the policy LM and the degree heads, so that one DDP/FSDP wrapper
covers both and their gradients are synchronised in the same backward. Its forward runs the
decoder once over ``[prompt | chosen | rejected | variants]`` rows and returns:

* ``logps`` [n_scored]: summed log-probs of each scored sequence. The LM head runs only on the
  hidden states that predict response tokens (not on prompts, variants or padding), in chunks
  of ``logits_chunk`` tokens: with more than one chunk and gradients on, each chunk is
  recomputed in the backward (activation checkpointing of the LM head), so at most one chunk
  of ``[tokens x vocabulary]`` float32 logits is alive at a time — a 128k vocabulary costs
  ``logits_chunk x 128k x 4`` bytes, not ``sequence x batch x 128k x 4``.
* ``logits_sum`` [n_scored] (detached): the sum over each sequence's tokens of the mean logit
  over the vocabulary — TRL's ``logits/chosen`` metric once divided by the token count.
* ``degree_chosen`` / ``degree_rejected``: the degree heads' logits per sample, from the hidden
  states of each sample's tokens (with gradient: the degree loss trains the LM too).

``adapters=False`` runs a LoRA model with its adapters disabled: the reference model, through
the same (possibly sharded) module.

What the GPU is spent on, and the options that change it (docs/training.md, "Speed"):

* the mask: a dense boolean ``[R, 1, L, L]`` mask for sdpa/eager, or with
  ``train.packed_attention: flex`` a flex-attention ``BlockMask`` from the same rule
  (:func:`spo.training.data.may_attend`): the kernel then skips the blocks where no query sees a
  key — across pairs and between a pair's responses — instead of computing and masking them.
  PyTorch has no flex-attention backward on a CPU, so there the trainer keeps the dense mask
  (:func:`select_attention`, logged);
* the LM head: with a frozen head (LoRA), the gradient of each log-prob with respect to its
  hidden state is computed in the forward, chunk by chunk (:class:`FrozenHeadLogps`), so the
  backward neither recomputes the logits nor keeps them — two head matrix products per chunk
  instead of three, and the same numbers;
* ``train.compile``: each decoder layer compiled with ``torch.compile`` (regional compilation,
  as torchtune does: one layer's graph serves all layers, the state dict keeps its names).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812 - PyTorch's own convention
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

from spo.errors import InputError
from spo.training.data import SIDES, PackedBatch, attention_mask_4d, may_attend

log = logging.getLogger("spo.train")

MASK_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")
FLEX = "flex_attention"


def _chunk_logps(hidden: Tensor, targets: Tensor, head: nn.Module, softcap: float | None) -> tuple[Tensor, Tensor]:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    picked = torch.gather(logits, 1, targets[:, None]).squeeze(1)
    return picked - torch.logsumexp(logits, dim=-1), logits.detach().mean(-1)


class FrozenHeadLogps(torch.autograd.Function):
    """log p(target) and the mean logit of each row of ``hidden`` [T, d] through a frozen linear
    head (``weight`` [V, d], no bias), ``chunk`` rows at a time.

    Why: a log-prob's gradient with respect to its logits, ``onehot(target) − softmax`` (times
    ``1 − tanh²`` under a soft cap), does not depend on the loss; only its scale, one number per
    token, comes from the backward. So the forward computes ``(onehot − softmax) @ weight`` [T, d]
    while the chunk's logits exist, and the backward only scales it: no logits kept, none
    recomputed. With a trainable head (full fine-tuning) the weight's gradient needs the logits
    again, and :func:`token_logps` recomputes the chunk instead.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, targets: Tensor, weight: Tensor, softcap: float | None,
                chunk: int) -> tuple[Tensor, Tensor]:
        logps, means, grads = [], [], []
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start: start + chunk], targets[start: start + chunk, None]
            logits = F.linear(h, weight).float()
            capped = None
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            logps.append((logits.gather(1, t) - lse).squeeze(1))
            means.append(logits.mean(-1))
            d_logits = torch.exp(logits - lse).neg_().scatter_add_(1, t, torch.ones_like(lse))
            if capped is not None:
                d_logits *= 1 - capped * capped
            if not torch.is_autocast_enabled(hidden.device.type):  # (autocast casts both to its dtype)
                d_logits = d_logits.to(weight.dtype)  # as the backward of ``head(h).float()`` would
            grads.append(torch.matmul(d_logits, weight).to(hidden.dtype))
        ctx.save_for_backward(torch.cat(grads))
        mean_logits = torch.cat(means)
        ctx.mark_non_differentiable(mean_logits)
        return torch.cat(logps), mean_logits

    @staticmethod
    def backward(ctx: Any, grad_logps: Tensor, _grad_means: Tensor | None) -> tuple[Tensor | None, ...]:
        (d_hidden,) = ctx.saved_tensors
        return (grad_logps[:, None].to(d_hidden.dtype) * d_hidden), None, None, None, None


def _frozen_linear(head: nn.Module) -> bool:
    """A plain linear head whose weight gets no gradient (LoRA's LM head)."""
    return isinstance(head, nn.Linear) and head.bias is None and not head.weight.requires_grad


def token_logps(hidden: Tensor, targets: Tensor, head: nn.Module, chunk: int,
                softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """log p(target) of each row of ``hidden`` [T, d] and its mean logit, ``chunk`` rows at a time.

    Float32 log-softmax by gather − logsumexp; see the module docstring for the memory bound.
    A frozen head with gradients on goes through :class:`FrozenHeadLogps`.
    """
    recompute = torch.is_grad_enabled()
    if recompute and hidden.requires_grad and _frozen_linear(head):
        logps, means = FrozenHeadLogps.apply(hidden, targets, head.weight, softcap, chunk)
        return logps, means
    if hidden.shape[0] <= chunk:
        return _chunk_logps(hidden, targets, head, softcap)
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start: start + chunk], targets[start: start + chunk]
        if recompute:
            parts.append(checkpoint(_chunk_logps, h, t, head, softcap, use_reentrant=False))
        else:
            parts.append(_chunk_logps(h, t, head, softcap))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def block_mask(segment_ids: Tensor, context_ids: Tensor) -> Any:
    """The packed batch's mask as a flex-attention ``BlockMask`` (:func:`may_attend`, the dense
    mask's rule): blocks where no query sees a key are skipped by the kernel."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg, ctx = segment_ids, context_ids

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return may_attend(seg[b, q], seg[b, k], ctx[b, q], q, k)

    rows, length = seg.shape
    return create_block_mask(mask_mod, rows, None, length, length, device=seg.device)


# A causal LM: a transformers model, or a PEFT model around one. Its methods (get_decoder,
# get_output_embeddings, disable_adapter) are looked up at run time, and checked by
# check_attention: through nn.Module's __getattr__ mypy would type each as Tensor | Module.
CausalLM = Any


def check_attention(lm: CausalLM) -> str:
    """The attention implementation, if the packed 4-D mask works with it (else InputError)."""
    impl = getattr(getattr(lm, "config", None), "_attn_implementation", None) or "eager"
    if impl not in MASK_IMPLEMENTATIONS:
        raise InputError(
            f"model.attn_implementation {impl!r}: the trainer packs each pair's segments with a 4-D attention mask, "
            f"which needs one of {list(MASK_IMPLEMENTATIONS)} (sdpa uses the memory-efficient kernel on GPUs)"
        )
    try:
        if lm.get_decoder() is None or lm.get_output_embeddings() is None:
            raise AttributeError
    except (AttributeError, NotImplementedError):
        raise InputError(f"{type(lm).__name__}: the trainer needs a causal LM with get_decoder() and an output "
                         "embedding (LM head)") from None
    return impl


def select_attention(lm: CausalLM, packed_attention: str, device: torch.device) -> str:
    """Put the policy on the attention that ``train.packed_attention`` asks for, where PyTorch can
    train with it, and return the implementation in use.

    ``flex`` switches the model to flex attention on CUDA. PyTorch has no flex-attention backward
    on a CPU, so there a ``flex`` request (or a model loaded with flex attention) trains with sdpa
    and the dense mask instead: the same numbers, logged, so the CPU path and its tests keep working."""
    impl = check_attention(lm)
    wanted = FLEX if packed_attention == "flex" else impl
    if wanted == FLEX and device.type != "cuda":
        log.warning("train.packed_attention flex: PyTorch %s has no flex-attention backward on %s; training with sdpa "
                    "and the dense mask instead", torch.__version__, device.type)
        wanted = "sdpa"
    if wanted != impl:
        lm.set_attn_implementation(wanted)
    return check_attention(lm)


def compile_layers(lm: CausalLM) -> int:
    """``torch.compile`` each decoder layer in place (``train.compile``): regional compilation, so
    one graph serves every layer (compile time of one layer, not of the model), the state dict
    keeps its keys (checkpoints and saved policies are unchanged), and the LM head, the log-probs
    and the losses stay eager. Returns the number of layers compiled."""
    layers = getattr(lm.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise InputError(f"train.compile: {type(lm).__name__}'s decoder has no `layers` list to compile")
    for layer in layers:
        layer.compile()
    return len(layers)


class SPOModule(nn.Module):
    """The policy LM plus the degree heads; ``forward`` is the concatenated forward (module doc)."""

    def __init__(self, lm: CausalLM, heads: nn.Module | None, logits_chunk: int = 4096) -> None:
        super().__init__()
        self.lm: CausalLM = lm
        self.heads = heads
        self.logits_chunk = logits_chunk
        self.attn = check_attention(lm)
        self.softcap = getattr(getattr(lm, "config", None), "final_logit_softcapping", None)

    def mask(self, batch: PackedBatch) -> Any:
        """The batch's attention mask in the form the model's attention takes (module docstring)."""
        if self.attn == FLEX:
            return block_mask(batch.segment_ids, batch.context_ids)
        return attention_mask_4d(batch.segment_ids, batch.context_ids, None if self.attn == "sdpa" else torch.float32)

    def forward(self, batch: PackedBatch, sides: tuple[bool, bool] = (False, False),
                adapters: bool = True) -> dict[str, Any]:
        # named ranges (free without a profiler) let bench/bench_gpu.py --profile attribute the step's time
        with record_function("spo/attention_mask"):
            mask = self.mask(batch)
        context = nullcontext() if adapters or not hasattr(self.lm, "disable_adapter") else self.lm.disable_adapter()
        with context:
            hidden = self.lm.get_decoder()(input_ids=batch.input_ids, attention_mask=mask,
                                           position_ids=batch.position_ids, use_cache=False).last_hidden_state
            flat = hidden.reshape(-1, hidden.shape[-1])
            with record_function("spo/lm_head_logps"):
                logps, mean_logits = token_logps(flat[batch.score_index], batch.score_target,
                                                 self.lm.get_output_embeddings(), self.logits_chunk, self.softcap)
        zeros = torch.zeros(batch.n_scored, dtype=logps.dtype, device=logps.device)
        out: dict[str, Any] = {
            "logps": zeros.index_add(0, batch.score_seq, logps),
            "logits_sum": zeros.index_add(0, batch.score_seq, mean_logits).detach(),
        }
        if self.heads is None:
            return out
        with record_function("spo/degree_heads"):
            for s, side in enumerate(SIDES):
                if not sides[s]:
                    continue
                samples = (batch.deg_side == s).nonzero(as_tuple=True)[0]
                if samples.numel():
                    local = torch.full((batch.deg_label.numel(),), -1, dtype=torch.long, device=samples.device)
                    local[samples] = torch.arange(samples.numel(), device=samples.device)
                    tokens = (local[batch.deg_sample] >= 0).nonzero(as_tuple=True)[0]
                    out[f"degree_{side}"] = self.heads(flat[batch.deg_index[tokens]],
                                                       local[batch.deg_sample[tokens]], batch.deg_pos[tokens],
                                                       samples.numel(), side)
                else:  # keep the head in the graph (DDP): one empty sample, zero-weighted by the loss
                    out[f"degree_{side}"] = self.heads(flat[:0], batch.deg_sample[:0], batch.deg_pos[:0], 1, side)
        return out
