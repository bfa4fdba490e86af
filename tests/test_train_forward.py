"""The packed concatenated forward equals the plain one, and the chunked LM head equals the whole one."""

from __future__ import annotations

import pytest
import torch
from test_train_support import hh_pairs, tiny_model, train_cfg

from spo.training.data import PairCollator, tokenize_pairs
from spo.training.forward import SPOModule, token_logps
from spo.training.heads import DegreeClassifier


def _plain_logps(lm: torch.nn.Module, prompt: list[int], response: list[int]) -> float:
    ids = torch.tensor([prompt + response])
    logits = lm(input_ids=ids).logits[0, len(prompt) - 1: -1].float()
    return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).sum())


def _plain_hidden(lm: torch.nn.Module, prompt: list[int], response: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + response])
    return lm.get_decoder()(input_ids=ids).last_hidden_state[0, len(prompt):]


def test_packed_forward_equals_one_row_per_sequence() -> None:
    """Pairs packed several to a row, each with its prompt once and its segments: every sequence's
    log-probs and every variant's features are what a row of its own would give."""
    rows, degs = hh_pairs()
    tok, lm = tiny_model()
    lm.eval()
    examples, _ = tokenize_pairs(rows[:30], degs[:30], tok, max_length=200, max_prompt_length=150,
                                 degree_mode="reencode")
    distinct = [i for i, ex in enumerate(examples) if all(sd.distinct for sd in ex.degrees.values())]
    distinct.sort(key=lambda i: examples[i].length)
    idx = [distinct[-1], *distinct[:3]]  # a long pair and three short ones: the short ones share a row
    batch = PairCollator(tok.pad_token_id, "reencode")([examples[i] for i in idx], idx)
    assert batch.input_ids.shape[0] < len(idx)
    cfg = train_cfg().spo
    heads = DegreeClassifier(lm.config.hidden_size, 4, cfg.model_copy(update={"positional_encoding": False})).eval()
    for impl in ("sdpa", "eager"):
        lm.config._attn_implementation = impl
        with torch.no_grad():
            out = SPOModule(lm, heads)(batch, (True, True))
            for j, i in enumerate(idx):
                ex = examples[i]
                # float32 sums of hundreds of log-probs: equal to ~1e-7 relative
                assert float(out["logps"][j]) == pytest.approx(_plain_logps(lm, ex.prompt_ids, ex.chosen_ids), rel=1e-5)
                assert float(out["logps"][len(idx) + j]) == pytest.approx(
                    _plain_logps(lm, ex.prompt_ids, ex.rejected_ids), rel=1e-5)
            # a variant's features are its hidden states as if encoded alone after the prompt
            for j, i in enumerate(idx):
                ex = examples[i]
                variant = ex.degrees["rejected"].variant_ids[1]  # level 2
                expected = heads.head_for("rejected")(_plain_hidden(lm, ex.prompt_ids, variant).mean(0, keepdim=True))
                sample = ((batch.deg_side == 1) & (batch.deg_label == 2)).nonzero()[j].item()
                local = int((batch.deg_side[:sample] == 1).sum())
                assert torch.allclose(out["degree_rejected"][local], expected[0], atol=1e-4)


def test_chunked_lm_head_equals_whole_with_the_same_gradients() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(13, 8, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    whole, mean_whole = token_logps(hidden, targets, head, chunk=100)
    whole.sum().backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    chunked, mean_chunked = token_logps(hidden, targets, head, chunk=4)  # 4 chunks, each recomputed in backward
    chunked.sum().backward()
    assert torch.allclose(whole, chunked, atol=1e-6) and torch.allclose(mean_whole, mean_chunked, atol=1e-6)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-6) and torch.allclose(grads[1], head.weight.grad, atol=1e-6)
    reference = torch.log_softmax(head(hidden), -1).gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(whole, reference, atol=1e-5)
