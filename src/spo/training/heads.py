"""The SPO degree classifier: pooled LM hidden states (+ positional encoding) → MLP → N levels.

See docs/method.md ("Our definitions and defaults": the rows features, positional encoding and
heads). The classifier reads the policy's own final-layer hidden states *with gradient*, so its
cross-entropy trains the LM as well as the heads. Each kept token gets the sinusoidal encoding
of its position within the ORIGINAL response added before mean pooling: that is what lets the
classifier see where content is missing (a variant's tokens have gaps in their original
positions).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from spo.config import DegreeLossConfig

__all__ = ["sinusoidal_encoding", "pooled_mean", "DegreeHead", "DegreeClassifier", "save_classifier", "load_classifier"]

WEIGHTS_FILE = "degree_heads.safetensors"
CONFIG_FILE = "degree_heads.json"
SIDES = ("chosen", "rejected")


def sinusoidal_encoding(positions: Tensor, dim: int) -> Tensor:
    """Fixed Transformer encoding (Vaswani et al.): PE[p, 2i] = sin(p/10000^(2i/dim)), PE[p, 2i+1] = cos(same).

    positions [..., T] (int) → float32 [..., T, dim]. An odd ``dim`` is computed for dim + 1 and
    the last (cos) column dropped, so every column keeps the standard formula.
    """
    even_dim = dim + (dim % 2)
    inv_freq = torch.exp(
        torch.arange(0, even_dim, 2, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / even_dim)
    )
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [..., T, even_dim/2]
    pe = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # interleave sin, cos
    return pe[..., :dim]


def pooled_mean(features: Tensor, sample: Tensor, n_samples: int) -> Tensor:
    """Mean of feature rows [D, d] per sample (``sample`` [D] in 0..n_samples-1) → [n_samples, d].

    A sample with no token gives zeros rather than 0/0 = NaN (a variant whose response tokens
    were all removed or truncated must not poison the batch's loss). Summing by ``index_add``
    over the selected tokens only keeps memory proportional to them, not to samples × length.
    """
    total = torch.zeros((n_samples, features.shape[-1]), dtype=features.dtype, device=features.device)
    total = total.index_add(0, sample, features)
    count = torch.bincount(sample, minlength=n_samples).clamp(min=1).to(features.dtype)
    return total / count[:, None]


class DegreeHead(nn.Module):
    """MLP Linear(d, h) → GELU → Dropout(p) → Linear(h, N): one degree classifier."""

    def __init__(self, in_dim: int, hidden: int, n_levels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_levels))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


class DegreeClassifier(nn.Module):
    """Heads for the preferred ("chosen") and dis-preferred ("rejected") variants.

    ``cfg.heads == "two"``: ``heads = {"chosen", "rejected"}``; ``"shared"``: one head stored
    once under ``"shared"`` (the same module under two keys would duplicate its tensors in the
    state dict, which safetensors refuses) and used for both sides.
    """

    def __init__(self, hidden_size_of_lm: int, n_levels: int, cfg: DegreeLossConfig) -> None:
        super().__init__()
        self.hidden_size_of_lm = hidden_size_of_lm
        self.n_levels = n_levels
        self.cfg = cfg

        def make() -> DegreeHead:
            return DegreeHead(hidden_size_of_lm, cfg.hidden_size, n_levels, cfg.dropout)

        keys = ("shared",) if cfg.heads == "shared" else SIDES
        self.heads = nn.ModuleDict({key: make() for key in keys})

    def head_for(self, side: str) -> DegreeHead:
        """The head used for ``side`` ("chosen" or "rejected")."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        return self.heads["shared" if self.cfg.heads == "shared" else side]  # type: ignore[return-value]

    def forward(self, features: Tensor, sample: Tensor, positions: Tensor, n_samples: int, side: str) -> Tensor:
        """Logits float32 [n_samples, N] from the LM hidden states of the samples' tokens.

        ``features`` [D, d] (any dtype): the hidden state of every token of every sample;
        ``sample`` [D]: which sample each belongs to; ``positions`` [D] (int): its position within
        the ORIGINAL response. Runs in float32 with autocast off: hidden states of a bf16 LM are
        cast up, because the mean over hundreds of tokens and the small heads lose precision in bf16.
        """
        head = self.head_for(side)
        with torch.autocast(device_type=features.device.type, enabled=False):
            features = features.float()
            if self.cfg.positional_encoding:
                features = features + sinusoidal_encoding(positions, features.shape[-1])
            pooled = pooled_mean(features, sample, n_samples)
            param_dtype = next(head.parameters()).dtype
            return head(pooled.to(param_dtype)).float()

    def init_kwargs(self) -> dict[str, object]:
        """Constructor arguments, JSON-serialisable (what ``load_classifier`` rebuilds from)."""
        return {"hidden_size_of_lm": self.hidden_size_of_lm, "n_levels": self.n_levels, "cfg": self.cfg.model_dump()}


def save_classifier(module: DegreeClassifier, path_dir: str | Path) -> None:
    """Write degree_heads.safetensors + degree_heads.json into path_dir (beside the adapter/weights)."""
    path = Path(path_dir)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps(module.init_kwargs(), indent=2, sort_keys=True) + "\n")


def load_classifier(path_dir: str | Path, device: str | torch.device = "cpu") -> DegreeClassifier:
    """Rebuild a classifier saved by ``save_classifier`` (strict: every tensor must match)."""
    path = Path(path_dir)
    kwargs = json.loads((path / CONFIG_FILE).read_text())
    module = DegreeClassifier(int(kwargs["hidden_size_of_lm"]), int(kwargs["n_levels"]),
                              DegreeLossConfig(**kwargs["cfg"]))
    module.load_state_dict(load_file(str(path / WEIGHTS_FILE), device=str(device)))
    return module.to(device)
