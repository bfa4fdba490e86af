"""The local judge: a Bradley-Terry reward model on the SFT backbone (docs/reward_judge.md).

:class:`RewardModel` is the SFT causal LM's decoder (the transformer without its LM head) plus
a scalar value head ``Linear(d, 1)`` that reads the final hidden state of the *last non-padding
token* of ``prompt + response``, formatted exactly as the policy sees it
(:func:`spo.models.formatting.encode_example`).  It is trained with the Bradley-Terry loss
``-log sigmoid(r_chosen - r_rejected)`` by the ``reward_model`` stage.

A saved reward model folder holds the backbone as :func:`spo.models.loading.save_model` writes
it (full weights, or a LoRA adapter on the SFT folder), the tokenizer, ``value_head.safetensors``
and ``reward_model.json`` (truncation lengths used in training, which scoring reuses).

:class:`RewardJudge` implements :class:`spo.judging.base.Judge`: it scores both responses of
every request and prefers the higher reward.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spo.config import ModelConfig
from spo.errors import InputError
from spo.judging.base import JudgeRequest, NotJudged, Verdict

log = logging.getLogger("spo.judging.reward")

VALUE_HEAD_FILE = "value_head.safetensors"
META_FILE = "reward_model.json"
TASK_SOURCE = {"dialogue": "hh", "summarization": "tldr"}
SOURCE_TASK = {source: task for task, source in TASK_SOURCE.items()}


def task_source(task: str) -> str:
    """The row ``source`` (for :func:`format_prompt`) of a judge task."""
    try:
        return TASK_SOURCE[task]
    except KeyError:
        raise ValueError(f"unknown judge task {task!r} (expected one of {sorted(TASK_SOURCE)})") from None


def _decoder(lm: Any) -> nn.Module:
    """The transformer under a causal LM (``model.model`` for Llama), through a peft wrapper.

    peft injects LoRA layers in place, so calling the inner decoder still runs the adapters.
    """
    from spo.models.loading import is_peft_model

    inner = lm.get_base_model() if is_peft_model(lm) else lm
    base = getattr(inner, "base_model", inner)
    if base is inner:
        raise InputError(f"{type(inner).__name__}: cannot find the decoder under this causal LM (no base_model_prefix)")
    return base


class RewardModel(nn.Module):
    """``score(input_ids, attention_mask) -> [B]`` rewards; ``lm`` is the (possibly peft) causal LM."""

    def __init__(self, lm: Any, value_head: nn.Linear | None = None, *, seed: int = 0) -> None:
        super().__init__()
        self.lm = lm
        hidden = int(lm.config.get_text_config().hidden_size)
        if value_head is None:
            value_head = nn.Linear(hidden, 1)
            # Small random init (std 1/sqrt(d+1), as TRL's value head): a zero head would tie every
            # pair and make "accuracy before training" meaningless.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                nn.init.normal_(value_head.weight, std=1.0 / (hidden + 1) ** 0.5)
                nn.init.zeros_(value_head.bias)
        if value_head.in_features != hidden:
            raise InputError(f"value head reads {value_head.in_features} features, the backbone has {hidden}")
        self.value_head = value_head.float()
        self.max_length: int | None = None
        self.max_prompt_length: int | None = None

    @property
    def decoder(self) -> nn.Module:
        return _decoder(self.lm)

    @property
    def device(self) -> torch.device:
        return self.value_head.weight.device

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What the value head reads: the final hidden state at the last position whose mask is 1
        (either padding side), in float32, [B, d]."""
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * (positions + 1)).argmax(dim=1)  # last index with mask 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One reward per row: the value head on :meth:`features`."""
        return self.value_head(self.features(input_ids, attention_mask)).squeeze(-1)

    forward = score

    def save(self, out_dir: str | Path, tokenizer: Any = None) -> Path:
        from safetensors.torch import save_file

        from spo.models.loading import save_model

        out = save_model(self.lm, tokenizer, out_dir)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                  str(out / VALUE_HEAD_FILE))
        meta = {"hidden_size": self.value_head.in_features, "max_length": self.max_length,
                "max_prompt_length": self.max_prompt_length}
        (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return out

    @classmethod
    def load(cls, model_dir: str | Path, model_cfg: ModelConfig, *, trainable: bool = False,
             base: str | Path | None = None) -> RewardModel:
        """Read what :meth:`save` wrote; a LoRA backbone is merged unless ``trainable``."""
        from safetensors.torch import load_file

        from spo.models.loading import load_trained

        folder = Path(model_dir)
        head_file = folder / VALUE_HEAD_FILE
        if not head_file.is_file():
            raise InputError(f"{folder}: no {VALUE_HEAD_FILE}; not a reward model folder (run the reward_model stage)")
        lm = load_trained(folder, model_cfg, trainable=trainable, merge=not trainable, base=base)
        state = load_file(str(head_file))
        hidden = state["weight"].shape[1]
        head = nn.Linear(hidden, 1)
        head.load_state_dict(state)
        model = cls(lm, head)
        meta_file = folder / META_FILE
        if meta_file.is_file():
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            model.max_length, model.max_prompt_length = meta.get("max_length"), meta.get("max_prompt_length")
        if not trainable:
            model.eval()
            model.requires_grad_(False)
        return model


def collate(sequences: Sequence[Sequence[int]], pad_id: int,
            device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask)``; padding is masked, so pad may equal eos."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def encode(tokenizer: Any, prompt: str, response: str, source: str, *, max_prompt_length: int,
           max_length: int) -> list[int]:
    """``prompt + response`` token ids, formatted and truncated as every training stage does
    (:func:`~spo.models.formatting.encode_example`: a long prompt keeps the chat template's head
    and generation prompt and loses dialogue content from the left)."""
    from spo.models.formatting import encode_example

    enc = encode_example(
        tokenizer, prompt, response, source, max_prompt_length=max_prompt_length, max_length=max_length
    )
    return enc.prompt_ids + enc.response_ids


@torch.no_grad()
def sequence_features(model: RewardModel, sequences: Sequence[Sequence[int]], pad_id: int, *, batch_size: int = 16,
                      desc: str = "reward features") -> torch.Tensor:
    """:meth:`RewardModel.features` of many token sequences, in their order ([len, d], CPU; no grad)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[torch.Tensor | None] = [None] * len(sequences)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit=" batches", leave=False, disable=None):
        chunk = order[start : start + batch_size]
        ids, mask = collate([sequences[i] for i in chunk], pad_id, model.device)
        for i, row in zip(chunk, model.features(ids, mask).cpu()):
            out[i] = row
    model.train(was_training)
    return torch.stack(out)  # type: ignore[arg-type]


@torch.no_grad()
def score_sequences(model: RewardModel, sequences: Sequence[Sequence[int]], pad_id: int, *, batch_size: int = 16,
                    progress: bool = False, desc: str = "reward") -> list[float]:
    """Rewards of many token sequences, in their order (batched by similar length, no grad)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = [0.0] * len(sequences)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, unit=" batches", leave=False, disable=None if progress else True):
        chunk = order[start : start + batch_size]
        ids, mask = collate([sequences[i] for i in chunk], pad_id, model.device)
        for i, value in zip(chunk, model.score(ids, mask).tolist()):
            scores[i] = float(value)
    model.train(was_training)
    return scores


def pair_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    """Share of pairs with r_chosen > r_rejected; an exact tie counts one half."""
    if not chosen:
        return float("nan")
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected))
    return wins / len(chosen)


class RewardJudge:
    """The :class:`~spo.judging.base.Judge` backed by a trained reward model folder.

    Winner is ``"A"`` when ``r_a >= r_b`` else ``"B"``: an exact float tie (practically never
    happens, except for identical responses) goes to A, so a verdict is never None.
    """

    def __init__(
        self,
        model_dir: str | Path,
        model_cfg: ModelConfig | None = None,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        device: str | torch.device | None = None,
        model: RewardModel | None = None,
        tokenizer: Any = None,
    ) -> None:
        from spo.models.loading import load_tokenizer

        model_cfg = model_cfg or ModelConfig()
        self.model_dir = str(model_dir)
        self.judge_id = f"reward:{self.model_dir}"
        self.tokenizer = (tokenizer if tokenizer is not None
                          else load_tokenizer(model_dir, trust_remote_code=model_cfg.trust_remote_code))
        self.model = model if model is not None else RewardModel.load(model_dir, model_cfg)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(device)
        self.batch_size = batch_size
        self.max_length = max_length or self.model.max_length or 256
        self.max_prompt_length = max_prompt_length or self.model.max_prompt_length or min(192, self.max_length // 2)
        if self.max_prompt_length >= self.max_length:
            raise InputError(f"reward judge: max_prompt_length {self.max_prompt_length} "
                             f"must be below max_length {self.max_length}")

    def scores(self, requests: Sequence[JudgeRequest], progress: bool = True) -> list[tuple[float, float]]:
        """``(r_a, r_b)`` per request."""
        sequences = []
        for request in requests:
            source = task_source(request.task)
            for response in (request.response_a, request.response_b):
                sequences.append(
                    encode(self.tokenizer, request.prompt, response, source,
                           max_prompt_length=self.max_prompt_length, max_length=self.max_length)
                )
        flat = score_sequences(self.model, sequences, self.tokenizer.pad_token_id, batch_size=self.batch_size,
                               progress=progress, desc="reward judge")
        return list(zip(flat[0::2], flat[1::2]))

    def judge_many(self, requests: Sequence[JudgeRequest], progress: bool = True) -> list[Verdict | NotJudged]:
        verdicts: list[Verdict | NotJudged] = []
        for r_a, r_b in self.scores(requests, progress=progress):
            verdicts.append(Verdict(winner="A" if r_a >= r_b else "B", raw=f"reward A={r_a:.4f} B={r_b:.4f}",
                                    explanation=None))
        return verdicts
