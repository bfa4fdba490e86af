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
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

from spo.errors import InputError
from spo.training.data import SIDES, PackedBatch, attention_mask_4d

MASK_IMPLEMENTATIONS = ("sdpa", "eager")


def _chunk_logps(hidden: Tensor, targets: Tensor, head: nn.Module, softcap: float | None) -> tuple[Tensor, Tensor]:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    picked = torch.gather(logits, 1, targets[:, None]).squeeze(1)
    return picked - torch.logsumexp(logits, dim=-1), logits.detach().mean(-1)


def token_logps(hidden: Tensor, targets: Tensor, head: nn.Module, chunk: int,
                softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """log p(target) of each row of ``hidden`` [T, d] and its mean logit, ``chunk`` rows at a time.

    Float32 log-softmax by gather − logsumexp; see the module docstring for the memory bound.
    """
    if hidden.shape[0] <= chunk:
        return _chunk_logps(hidden, targets, head, softcap)
    recompute = torch.is_grad_enabled()
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start: start + chunk], targets[start: start + chunk]
        if recompute:
            parts.append(checkpoint(_chunk_logps, h, t, head, softcap, use_reentrant=False))
        else:
            parts.append(_chunk_logps(h, t, head, softcap))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


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


class SPOModule(nn.Module):
    """The policy LM plus the degree heads; ``forward`` is the concatenated forward (module doc)."""

    def __init__(self, lm: CausalLM, heads: nn.Module | None, logits_chunk: int = 4096) -> None:
        super().__init__()
        self.lm: CausalLM = lm
        self.heads = heads
        self.logits_chunk = logits_chunk
        self.attn = check_attention(lm)
        self.softcap = getattr(getattr(lm, "config", None), "final_logit_softcapping", None)

    def forward(self, batch: PackedBatch, sides: tuple[bool, bool] = (False, False),
                adapters: bool = True) -> dict[str, Any]:
        # named ranges (free without a profiler) let bench/bench_gpu.py --profile attribute the step's time
        with record_function("spo/attention_mask"):
            mask = attention_mask_4d(batch.segment_ids, batch.context_ids,
                                     None if self.attn == "sdpa" else torch.float32)
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
