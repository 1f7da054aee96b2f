"""From stored replies to tensors: left-padded batches and per-token reply log-probs.

Each sample is one reply: its prompt tokens (the conversation as the model saw it), its reply
tokens (ending with the end-of-turn token when it stopped on its own), the per-token behaviour
log-probs stored when it was sampled, and its advantage. Rows are padded on the left, so every
reply ends at the last position and only the last R + 1 positions need logits (R = longest
reply): the prompt never goes through the vocabulary projection. Masks are 1 on reply tokens
only; prompt and padding never carry loss.

Left out: packing several samples into one row, gradient checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sample:
    reply_id: int
    prompt: list[int]
    reply: list[int]
    behaviour: list[float]
    advantage: float = 0.0
    ref: list[float] | None = None  # cached reference log-probs, when known


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) left-padded prompt + reply
    attention_mask: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    targets: torch.Tensor  # (B, R) the last R tokens of each row
    mask: torch.Tensor  # (B, R) 1 on reply tokens
    behaviour: torch.Tensor  # (B, R) behaviour log-probs, 0 where mask is 0
    advantages: torch.Tensor  # (B,)

    @property
    def reply_width(self) -> int:
        return self.targets.shape[1]


def _right_aligned(rows: list[list[float]], width: int, dtype, fill=0) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            out[i, width - len(row):] = torch.tensor(row, dtype=dtype)
    return out


def collate(samples: list[Sample], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    assert samples and all(s.reply and s.prompt for s in samples)
    assert all(len(s.reply) == len(s.behaviour) for s in samples)
    sequences = [s.prompt + s.reply for s in samples]
    width = max(len(s.reply) for s in samples)
    input_ids = _right_aligned(sequences, max(map(len, sequences)), torch.long, fill=pad_id)
    attention_mask = _right_aligned([[1] * len(s) for s in sequences], input_ids.shape[1],
                                    torch.long)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    batch = Batch(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        targets=input_ids[:, -width:],
        mask=_right_aligned([[1.0] * len(s.reply) for s in samples], width, torch.float32),
        behaviour=_right_aligned([s.behaviour for s in samples], width, torch.float32),
        advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float32))
    return Batch(**{k: v.to(device) for k, v in vars(batch).items()})


def distributions(model, batch: Batch) -> torch.Tensor:
    """Log-probs over the whole vocabulary (B, R, V) at each reply position."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, logits_to_keep=batch.reply_width + 1,
                use_cache=False)
    logits = out.logits[:, :-1].float()  # (B, R, V): position p predicts token p + 1
    return torch.log_softmax(logits, dim=-1)


def token_logprobs(model, batch: Batch) -> torch.Tensor:
    """Per-token log-probs (B, R) of the reply tokens under `model` as it is now."""
    logp = distributions(model, batch).gather(-1, batch.targets[..., None])[..., 0]
    return logp * batch.mask


def ref_to_tensor(samples: list[Sample], width: int, device) -> torch.Tensor:
    return _right_aligned([s.ref for s in samples], width, torch.float32).to(device)
