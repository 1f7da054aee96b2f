"""From stored replies to tensors: left-padded batches and per-token reply log-probs.

Each sample is one reply: its prompt tokens (the conversation as the model saw it), its reply
tokens (ending with the end-of-turn token when it stopped on its own), the per-token behaviour
log-probs stored when it was sampled, and its advantage. Rows are padded on the left, so every
reply ends at the last position and only the last R + 1 positions need logits (R = longest
reply): the prompt never goes through the vocabulary projection. Masks are 1 on reply tokens
only; prompt and padding never carry loss.

The two replies of a pair share their prompt. When replies in a batch do, and the prompts are
long enough for it to pay (SHARE_AT: later turns of a conversation, not a one-line question),
the model reads each distinct prompt once and continues every reply from its prompt's keys
and values (`SharedPrompts`): the same numbers, minus one prompt's worth of compute per pair.
Gradients flow through the shared keys and values into the prompt's LoRA weights, as they do
on separate rows.

Left out: packing several samples into one row, gradient checkpointing, sharing a prefix that
is only part of a prompt (earlier turns of one conversation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sample:
    reply_id: int
    prompt: list[int]
    reply: list[int]
    behaviour: list[float] | None  # None: no sampler made it (a person's rewrite)
    advantage: float = 0.0
    ref: list[float] | None = None  # cached reference log-probs, when known


def sample_kind(sample: Sample) -> str:
    """What a sample is, for diagnostics: a stored reply, a person's rewrite, or a reply the
    learner sampled itself (fresh replies beside a correction, --self-samples)."""
    if sample.reply_id > 0:
        return "reply"
    return "rewrite" if sample.behaviour is None else "own sample"


@dataclass
class SharedPrompts:
    """The distinct prompts of a batch, left-padded, and each row's replies after its prompt."""
    prompt_ids: torch.Tensor  # (P, Lp) the distinct prompts, left-padded
    prompt_mask: torch.Tensor  # (P, Lp)
    row_prompt: torch.Tensor  # (B,) the prompt each row's reply follows
    reply_ids: torch.Tensor  # (B, R) each reply from its first token, right-padded
    reply_lengths: torch.Tensor  # (B,)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) left-padded prompt + reply
    attention_mask: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    targets: torch.Tensor  # (B, R) the last R tokens of each row
    mask: torch.Tensor  # (B, R) 1 on reply tokens
    behaviour: torch.Tensor  # (B, R) behaviour log-probs, 0 where mask is 0 or none is known
    advantages: torch.Tensor  # (B,)
    shared: SharedPrompts | None = None  # set when two rows or more have the same prompt

    @property
    def reply_width(self) -> int:
        return self.targets.shape[1]


def _right_aligned(rows: list[list[float]], width: int, dtype, fill=0) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            out[i, width - len(row):] = torch.tensor(row, dtype=dtype)
    return out


# Read shared prompts once when that saves at least this share of a batch's tokens: two passes
# cost more than one over the same tokens. `python -m bench shared-prompts` on the embedded
# model (2 CPU threads, 4 pairs of 64-token replies), forward+backward against one row per
# reply: 0.99x at 18% saved (a one-line question), 0.87x at 25%, 0.77x at 30%, 0.52x at 41%
# (300-token prompts); forward alone 1.03x at 18% (bench/results/shared-prompts-cpu.json).
SHARE_AT = 0.25


def prompt_tokens_saved(samples: list[Sample]) -> float:
    """The share of the samples' tokens that reading each distinct prompt once saves."""
    saved = (sum(len(s.prompt) for s in samples)
             - sum(len(p) for p in {tuple(s.prompt) for s in samples}))
    return saved / sum(len(s.prompt) + len(s.reply) for s in samples)


def _shared_prompts(samples: list[Sample], pad_id: int, share_at: float) -> SharedPrompts | None:
    saved = prompt_tokens_saved(samples)
    if not saved or saved < share_at:
        return None
    distinct: dict[tuple[int, ...], int] = {}
    row_prompt = [distinct.setdefault(tuple(s.prompt), len(distinct)) for s in samples]
    prompts = [list(p) for p in distinct]
    width = max(len(s.reply) for s in samples)
    reply_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    for i, s in enumerate(samples):
        reply_ids[i, :len(s.reply)] = torch.tensor(s.reply)
    prompt_ids = _right_aligned(prompts, max(map(len, prompts)), torch.long, fill=pad_id)
    return SharedPrompts(
        prompt_ids=prompt_ids,
        prompt_mask=_right_aligned([[1] * len(p) for p in prompts], prompt_ids.shape[1],
                                   torch.long),
        row_prompt=torch.tensor(row_prompt), reply_ids=reply_ids,
        reply_lengths=torch.tensor([len(s.reply) for s in samples]))


def collate(samples: list[Sample], pad_id: int, device: torch.device | str = "cpu",
            share_at: float = SHARE_AT) -> Batch:
    """The samples as one batch; with `shared` set where their prompts repeat enough for the
    model to read each one once (`share_at`: the share of tokens that saves; 0 = any repeat,
    inf = never)."""
    assert samples and all(s.reply and s.prompt for s in samples)
    assert all(s.behaviour is None or len(s.reply) == len(s.behaviour) for s in samples)
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
        behaviour=_right_aligned([s.behaviour or [] for s in samples], width, torch.float32),
        advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float32))
    batch = Batch(**{k: v.to(device) for k, v in vars(batch).items() if k != "shared"})
    shared = _shared_prompts(samples, pad_id, share_at)
    if shared is not None:
        batch.shared = SharedPrompts(**{k: v.to(device) for k, v in vars(shared).items()})
    return batch


def _logits_after_shared_prompts(model, shared: SharedPrompts) -> torch.Tensor:
    """(B, R, V) logits predicting each reply token, right-aligned like `Batch.targets`: the
    distinct prompts in one pass (its last position predicts every reply's first token), then
    all replies in a second pass on the prompts' keys and values, each row on its prompt's."""
    prompt_positions = (shared.prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=shared.prompt_ids, attention_mask=shared.prompt_mask,
                position_ids=prompt_positions, logits_to_keep=1, use_cache=True)
    first = out.logits[:, -1][shared.row_prompt]  # (B, V)
    rows, width = shared.reply_ids.shape
    if width == 1:
        left = first[:, None]
    else:
        cache = out.past_key_values
        cache.batch_select_indices(shared.row_prompt)  # differentiable: an index per row
        steps = torch.arange(width - 1, device=first.device)
        reply_mask = (steps[None] < shared.reply_lengths[:, None]).long()
        # The last reply token predicts nothing: feed the others.
        out = model(input_ids=shared.reply_ids[:, :-1],
                    attention_mask=torch.cat([shared.prompt_mask[shared.row_prompt],
                                              reply_mask], dim=1),
                    position_ids=shared.prompt_mask.sum(-1)[shared.row_prompt][:, None] + steps,
                    past_key_values=cache, use_cache=True)
        left = torch.cat([first[:, None], out.logits], dim=1)  # (B, R, V), reply at the start
    # Right-align: a reply of n tokens moves to the last n positions (the rest is masked).
    shift = (torch.arange(width, device=left.device)[None]
             - (width - shared.reply_lengths)[:, None]).clamp(min=0)
    return left.gather(1, shift[..., None].expand(-1, -1, left.shape[-1]))


def distributions(model, batch: Batch) -> torch.Tensor:
    """Log-probs over the whole vocabulary (B, R, V) at each reply position."""
    if batch.shared is not None:
        logits = _logits_after_shared_prompts(model, batch.shared).float()
    else:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, logits_to_keep=batch.reply_width + 1,
                    use_cache=False)
        logits = out.logits[:, :-1].float()  # (B, R, V): position p predicts token p + 1
    return torch.log_softmax(logits, dim=-1)


def taken(logp: torch.Tensor, batch: Batch) -> torch.Tensor:
    """From log-probs over the vocabulary (B, R, V), those of the reply tokens (B, R)."""
    return logp.gather(-1, batch.targets[..., None])[..., 0] * batch.mask


def token_logprobs(model, batch: Batch) -> torch.Tensor:
    """Per-token log-probs (B, R) of the reply tokens under `model` as it is now."""
    return taken(distributions(model, batch), batch)


def right_aligned_rows(rows: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Per-reply tensors (each reply's length first) as one batch shaped like `like`, each
    ending at the last position as the replies do; zeros before."""
    out = torch.zeros_like(like)
    for i, row in enumerate(rows):
        out[i, like.shape[1] - row.shape[0]:] = row
    return out


def ref_to_tensor(samples: list[Sample], width: int, device) -> torch.Tensor:
    return _right_aligned([s.ref for s in samples], width, torch.float32).to(device)
