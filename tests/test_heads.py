"""The degree classifier: encoding values, pooling, head layout, persistence, gradient flow."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from spo.config import DegreeLossConfig
from spo.training.heads import (
    DegreeClassifier,
    DegreeHead,
    load_classifier,
    pooled_mean,
    save_classifier,
    sinusoidal_encoding,
)

D, N = 16, 4


def _inputs(b: int = 3, t: int = 7,
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, t, D, generator=g).to(dtype)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 4:] = False
    positions = torch.arange(t).expand(b, t).clone()
    return hidden, mask, positions


def run(clf: DegreeClassifier, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
        side: str) -> torch.Tensor:
    """The classifier on dense [B, T] inputs, flattened as the trainer passes them: the selected
    tokens' features, their sample index and their positions."""
    rows, cols = mask.nonzero(as_tuple=True)
    return clf(hidden[rows, cols], rows, positions[rows, cols], hidden.shape[0], side)


def test_encoding_shape_and_values() -> None:
    pe = sinusoidal_encoding(torch.tensor([[0, 1, 5]]), 8)
    assert pe.shape == (1, 3, 8) and pe.dtype == torch.float32
    for p_idx, p in enumerate([0, 1, 5]):
        for i in range(4):
            freq = 1 / 10000 ** (2 * i / 8)
            assert pe[0, p_idx, 2 * i].item() == pytest.approx(math.sin(p * freq), abs=1e-6)
            assert pe[0, p_idx, 2 * i + 1].item() == pytest.approx(math.cos(p * freq), abs=1e-6)
    assert pe[0, 0].tolist() == pytest.approx([0, 1] * 4)


def test_encoding_odd_dim() -> None:
    pe = sinusoidal_encoding(torch.tensor([3, 9]), 5)
    assert pe.shape == (2, 5)
    even = sinusoidal_encoding(torch.tensor([3, 9]), 6)
    assert torch.allclose(pe, even[..., :5])  # the first columns follow the same formula
    assert pe[1, 4].item() == pytest.approx(math.sin(9 / 10000 ** (4 / 6)), abs=1e-6)


def test_pooled_mean_and_empty_samples() -> None:
    features = torch.tensor([[0.0, 1.0], [4.0, 5.0], [9.0, 9.0]])
    out = pooled_mean(features, torch.tensor([0, 0, 2]), 3)
    assert out[0].tolist() == pytest.approx([(0 + 4) / 2, (1 + 5) / 2])
    assert out[1].tolist() == [0.0, 0.0] and not torch.isnan(out).any()  # a sample without tokens
    assert out[2].tolist() == [9.0, 9.0]


def test_classifier_shapes_and_empty_mask() -> None:
    clf = DegreeClassifier(D, N, DegreeLossConfig()).eval()
    hidden, mask, positions = _inputs()
    mask[2] = False
    for side in ("chosen", "rejected"):
        logits = run(clf, hidden, mask, positions, side)
        assert logits.shape == (3, N) and logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
    with pytest.raises(ValueError):
        run(clf, hidden, mask, positions, "other")


def test_bf16_hidden_gives_float32_logits() -> None:
    clf = DegreeClassifier(D, N, DegreeLossConfig()).eval()
    hidden, mask, positions = _inputs(dtype=torch.bfloat16)
    logits = run(clf, hidden, mask, positions, "chosen")
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, run(clf, hidden.float(), mask, positions, "chosen"))


def test_shared_vs_two_heads() -> None:
    two = DegreeClassifier(D, N, DegreeLossConfig(heads="two", hidden_size=8))
    shared = DegreeClassifier(D, N, DegreeLossConfig(heads="shared", hidden_size=8))
    one = sum(p.numel() for p in DegreeHead(D, 8, N).parameters())
    assert one == D * 8 + 8 + 8 * N + N
    assert sum(p.numel() for p in two.parameters()) == 2 * one
    assert sum(p.numel() for p in shared.parameters()) == one
    assert set(two.state_dict()) == {f"heads.{s}.net.{i}.{w}" for s in ("chosen", "rejected") for i in (0, 3)
                                     for w in ("weight", "bias")}
    assert len(shared.state_dict()) == 4  # each tensor once
    assert shared.head_for("chosen") is shared.head_for("rejected")
    assert two.head_for("chosen") is not two.head_for("rejected")


@pytest.mark.parametrize("heads", ["two", "shared"])
def test_save_load_round_trip(tmp_path: Path, heads: str) -> None:
    cfg = DegreeLossConfig(heads=heads, hidden_size=8, positional_encoding=True)
    clf = DegreeClassifier(D, N, cfg).eval()
    save_classifier(clf, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "degree_heads.safetensors").is_file()
    assert (tmp_path / "adapter" / "degree_heads.json").is_file()
    back = load_classifier(tmp_path / "adapter").eval()
    assert back.cfg == cfg and back.n_levels == N and back.hidden_size_of_lm == D
    hidden, mask, positions = _inputs()
    for side in ("chosen", "rejected"):
        assert torch.equal(run(clf, hidden, mask, positions, side), run(back, hidden, mask, positions, side))


def test_gradients_reach_hidden_states() -> None:
    clf = DegreeClassifier(D, N, DegreeLossConfig()).train()
    hidden, mask, positions = _inputs(dtype=torch.bfloat16)
    hidden.requires_grad_(True)
    logits = run(clf, hidden, mask, positions, "rejected")
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    assert hidden.grad is not None and hidden.grad.dtype == torch.bfloat16
    assert hidden.grad[0].abs().sum() > 0
    assert hidden.grad[1, 4:].abs().sum() == 0  # masked-out tokens get no gradient
    assert all(p.grad is not None for p in clf.head_for("rejected").parameters())
    assert all(p.grad is None for p in clf.head_for("chosen").parameters())


def test_positional_encoding_on_and_off() -> None:
    hidden, mask, positions = _inputs()
    shifted = positions.clone()
    shifted[:, 3:] += 5  # a gap: tokens 3.. followed removed content
    torch.manual_seed(0)
    on = DegreeClassifier(D, N, DegreeLossConfig(positional_encoding=True)).eval()
    assert not torch.allclose(run(on, hidden, mask, positions, "chosen"), run(on, hidden, mask, shifted, "chosen"))
    off = DegreeClassifier(D, N, DegreeLossConfig(positional_encoding=False)).eval()
    off.load_state_dict(on.state_dict())
    assert torch.equal(run(off, hidden, mask, positions, "chosen"), run(off, hidden, mask, shifted, "chosen"))
    assert not torch.allclose(run(off, hidden, mask, positions, "chosen"), run(on, hidden, mask, positions, "chosen"))
