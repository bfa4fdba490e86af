"""The trainer's speed options compute what the default path computes (issue 26, item 2).

Each GPU speed path is kept only if numerically equal to the path it replaces, and each must run
on a CPU or fall back there, tested:

* flex attention's block mask has the dense mask's rule (one function, ``may_attend``), and the
  flex forward gives the dense forward's log-probs and degree logits (a CPU can run flex forward,
  not its backward: there the trainer keeps the dense mask, and trains bit for bit as before);
* a frozen LM head's log-probs, with their gradient computed in the forward, equal the
  recomputing chunked path in value and gradient (float32 and bf16 autocast, with a soft cap);
* ``train.compile`` (each decoder layer compiled, inductor on the CPU) gives the eager losses and
  weights, and leaves the state dict's keys as they were;
* ``train.pad_to_multiple_of`` rounds row lengths up and changes no log-prob.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_train_support import hh_pairs, state_of, tiny_model, train_cfg

from spo.training import forward
from spo.training.data import PairCollator, attention_mask_4d, may_attend, tokenize_pairs
from spo.training.forward import SPOModule, block_mask, token_logps
from spo.training.heads import DegreeClassifier
from spo.training.trainer import PreferenceTrainer

N_TRAIN = 32


def _trainer(cfg, lora: bool = False) -> PreferenceTrainer:  # noqa: ANN001
    rows, degs = hh_pairs()
    tok, model = tiny_model()
    if lora:
        from spo.config import LoraConfig
        from spo.models.loading import apply_lora

        model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0), seed=0)
    return PreferenceTrainer.from_rows(model, tok, cfg, rows[:N_TRAIN], degs[:N_TRAIN], seed=0, progress=False)


def _packed_batch(n: int = 6):  # noqa: ANN202
    """A packed batch of real pairs with degree variants, several pairs to a row, padding at the ends."""
    rows, degs = hh_pairs()
    tok, lm = tiny_model()
    examples, _ = tokenize_pairs(rows[:20], degs[:20], tok, max_length=160, max_prompt_length=100,
                                 degree_mode="reencode")
    order = sorted(range(len(examples)), key=lambda i: examples[i].length)
    idx = [order[-1], *order[:n - 1]]  # a long pair and short ones: the short ones share a row
    batch = PairCollator(tok.pad_token_id, "reencode", pad_to_multiple_of=64)([examples[i] for i in idx], idx)
    assert batch.input_ids.shape[0] < len(idx) and (batch.segment_ids < 0).any()  # padding too
    return tok, lm, batch


def test_flex_block_mask_has_the_dense_rule() -> None:
    """The mask_mod flex attention evaluates is the dense mask, element for element, padding included."""
    from torch.nn.attention.flex_attention import create_mask

    _, _, batch = _packed_batch()
    seg, ctx = batch.segment_ids, batch.context_ids
    rows, length = seg.shape

    def mask_mod(b, h, q, k):  # noqa: ANN001, ANN202 - flex's signature
        return may_attend(seg[b, q], seg[b, k], ctx[b, q], q, k)

    dense = create_mask(mask_mod, rows, 1, length, length, device="cpu")
    assert torch.equal(dense, attention_mask_4d(seg, ctx))
    mask = block_mask(seg, ctx)
    assert mask.shape == (rows, 1, length, length)
    # the point of it: blocks no query sees are skipped (pairs share rows, responses do not see each other)
    assert mask.sparsity() > 0


def test_flex_forward_equals_the_dense_forward_on_cpu() -> None:
    """Log-probs and degree logits through flex attention (forward: what a CPU can run) equal sdpa's."""
    _, lm, batch = _packed_batch()
    lm.eval()
    cfg = train_cfg().spo
    heads = DegreeClassifier(lm.config.hidden_size, 4, cfg).eval()
    with torch.no_grad():
        dense = SPOModule(lm, heads)(batch, (True, True))
        lm.set_attn_implementation("flex_attention")
        module = SPOModule(lm, heads)
        assert module.attn == "flex_attention"
        flex = module(batch, (True, True))
    for key in ("logps", "degree_chosen", "degree_rejected"):
        assert torch.allclose(dense[key], flex[key], rtol=1e-5, atol=1e-5), key


def test_flex_on_cpu_trains_as_the_dense_mask_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """A CPU has no flex backward: packed_attention flex keeps sdpa there, logged, and trains bit for bit
    as packed_attention mask."""
    with caplog.at_level(logging.WARNING, logger="spo.train"):
        flex = _trainer(train_cfg(packed_attention="flex", optim={"max_steps": 2}))
    assert flex.module.attn == "sdpa"
    assert "no flex-attention backward on cpu" in caplog.text
    dense = _trainer(train_cfg(optim={"max_steps": 2}))
    flex.train()
    dense.train()
    a, b = state_of(flex.module), state_of(dense.module)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("chunk", [4, 100])
def test_frozen_head_logps_equal_the_recomputed_path(softcap: float | None, chunk: int) -> None:
    """Value and gradient of the frozen-head path equal the chunked, recomputing one (one chunk or
    several), with a per-token upstream gradient as a loss gives it."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 70, bias=False).requires_grad_(False)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 70, (23,))
    upstream = torch.randn(23)

    def run(frozen_path: bool) -> tuple[torch.Tensor, ...]:
        hidden.grad = None
        saved = forward._frozen_linear
        forward._frozen_linear = (lambda h: saved(h)) if frozen_path else (lambda h: False)
        try:
            logps, means = token_logps(hidden, targets, head, chunk, softcap)
        finally:
            forward._frozen_linear = saved
        (logps * upstream).sum().backward()
        return logps.detach(), means, hidden.grad.clone()

    fused, recomputed = run(True), run(False)
    for a, b in zip(fused, recomputed):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not fused[1].requires_grad


def test_frozen_head_logps_under_bf16_autocast() -> None:
    """Under bf16 autocast (the GPU recipe) the two paths agree to bf16 precision."""
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 300, bias=False).requires_grad_(False)
    hidden = torch.randn(40, 32, requires_grad=True)
    targets = torch.randint(0, 300, (40,))
    results = []
    for frozen_path in (True, False):
        hidden.grad = None
        head.weight.requires_grad_(not frozen_path)  # a trainable head takes the recomputing path
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps, _ = token_logps(hidden, targets, head, 16)
        logps.sum().backward()
        results.append((logps.detach(), hidden.grad.clone()))
    (a, ga), (b, gb) = results
    assert a.dtype == torch.float32
    assert torch.allclose(a, b, rtol=1e-2, atol=2e-2)
    assert torch.allclose(ga, gb, rtol=2e-2, atol=1e-2)


def test_lora_training_through_the_frozen_head_path_equals_the_recomputed_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A LoRA run (frozen LM head) trains the same adapters with either LM-head path."""
    cfg = train_cfg(optim={"max_steps": 2}, logits_chunk=64)
    fused = _trainer(cfg, lora=True)
    calls = []
    apply = forward.FrozenHeadLogps.apply
    monkeypatch.setattr(forward.FrozenHeadLogps, "apply", lambda *a: calls.append(1) or apply(*a))
    fused.train()
    assert calls  # the LoRA head is frozen: its log-probs took the frozen-head path
    monkeypatch.setattr(forward, "_frozen_linear", lambda head: False)
    recomputed = _trainer(cfg, lora=True)
    recomputed.train()
    a, b = state_of(fused.module), state_of(recomputed.module)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # trained: lora_B starts at zero
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


def test_compiled_layers_train_as_eager() -> None:
    """train.compile (inductor on the CPU) gives the eager run's weights after two steps, same state dict keys."""
    eager = _trainer(train_cfg(optim={"max_steps": 2}, spo={"enabled": False}))
    compiled = _trainer(train_cfg(optim={"max_steps": 2}, spo={"enabled": False}, compile=True,
                                  pad_to_multiple_of=32))
    assert all(layer._compiled_call_impl is not None for layer in compiled.module.lm.model.layers)
    eager.train()
    compiled.train()
    a, b = state_of(eager.module), state_of(compiled.module)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k


def test_pad_to_multiple_of_buckets_lengths_and_changes_no_logps() -> None:
    rows, degs = hh_pairs()
    tok, lm = tiny_model()
    lm.eval()
    examples, _ = tokenize_pairs(rows[:8], degs[:8], tok, max_length=160, max_prompt_length=100,
                                 degree_mode="reencode")
    idx = list(range(4))
    plain = PairCollator(tok.pad_token_id, "reencode")([examples[i] for i in idx], idx)
    padded = PairCollator(tok.pad_token_id, "reencode", pad_to_multiple_of=48)([examples[i] for i in idx], idx)
    assert padded.input_ids.shape[1] % 48 == 0 and padded.input_ids.shape[1] >= plain.input_ids.shape[1]
    with torch.no_grad():
        a, b = SPOModule(lm, None)(plain)["logps"], SPOModule(lm, None)(padded)["logps"]
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
