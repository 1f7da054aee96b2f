"""What a round learns from: claimed feedback turned into samples, replay, and held-out pairs.

* Every pairwise vote (A or B) is assigned once to `train` or `heldout` by a hash of its id,
  so the split never changes and about `holdout` of the votes are never trained on: the
  promotion gate judges each candidate on them.
* Training samples are replies with an advantage (see objectives.py): the new feedback of this
  round plus `replay` earlier training items drawn at random, because every vote is a person's
  time and deserves more than one look. Replay stays honest through the stored behaviour
  log-probs and the clipped ratio.
* Ties give no samples; thumbs and "both bad" give single replies with a running-baseline
  advantage.

* No user holds more than `max_user_share` of the new or of the replayed items (see
  chatbot/limits.py).

Left out: prioritised replay, weighting users by how much they agree with others.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import torch

from chatbot.limits import fair_pick
from chatbot.store import Store
from learner.batch import Sample
from learner.objectives import pair_rewards, rloo_advantages, running_baseline_advantages

PAIRWISE = ("A", "B")


def split_of(vote_id: int, holdout: float) -> str:
    """train or heldout, fixed for a vote (a hash of its id: reproducible, not patterned)."""
    fraction = int(hashlib.sha256(f"vote-{vote_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "heldout" if fraction < holdout else "train"


@dataclass
class PreferencePair:
    chosen: Sample
    rejected: Sample

    @property
    def key(self) -> tuple[int, int]:
        return (self.chosen.reply_id, self.rejected.reply_id)


# What one new feedback item says about the replies, for the round's "reward" metric: +1 for a
# preferred reply or a thumbs up, 0 for a tie, -1 for "both bad" or a thumbs down.
FEEDBACK_REWARD = {"A": 1.0, "B": 1.0, "tie": 0.0, "both_bad": -1.0, "up": 1.0, "down": -1.0}


@dataclass
class RoundData:
    new_samples: list[Sample] = field(default_factory=list)  # from this round's feedback
    replay_samples: list[Sample] = field(default_factory=list)  # from earlier feedback
    pairs: list[PreferencePair] = field(default_factory=list)  # what DPO trains on
    heldout: list[PreferencePair] = field(default_factory=list)  # what the gate judges
    rewards: list[float] = field(default_factory=list)  # FEEDBACK_REWARD of each new item
    replayed_items: int = 0

    @property
    def samples(self) -> list[Sample]:
        """What the policy gradient trains on."""
        return self.new_samples + self.replay_samples


class RoundBuilder:
    """Reads the store and assembles one round's RoundData."""

    def __init__(self, store: Store, holdout: float, replay: int, max_heldout: int = 32,
                 max_user_share: float = 1.0, rng: random.Random | None = None) -> None:
        self.store = store
        self.holdout = holdout
        self.replay = replay
        self.max_user_share = max_user_share
        self.max_heldout = max_heldout
        self.rng = rng or random.Random()
        self._pairs: dict[str, dict] = {}

    def assign_splits(self, vote_ids: list[int]) -> None:
        if not vote_ids:
            return
        marks = ",".join("?" * len(vote_ids))
        votes = self.store.votes(f"id in ({marks}) and split is null", vote_ids)
        self.store.set_vote_splits({
            v["id"]: split_of(v["id"], self.holdout) if v["choice"] in PAIRWISE else "train"
            for v in votes})

    def build(self, claimed: dict[str, list[int]]) -> RoundData:
        self.assign_splits(claimed["votes"])
        absolute = self._absolute_advantages()
        data = RoundData()
        for vote in self._votes_by_id(claimed["votes"]):
            if vote["split"] != "heldout":
                self._add(data, data.new_samples, "vote", vote, absolute)
                data.rewards.append(FEEDBACK_REWARD[vote["choice"]])
        for rating in self._ratings_by_id(claimed["ratings"]):
            self._add(data, data.new_samples, "rating", rating, absolute)
            data.rewards.append(FEEDBACK_REWARD[rating["thumb"]])
        for kind, row in self._replay_items():
            self._add(data, data.replay_samples, kind, row, absolute)
            data.replayed_items += 1
        heldout = self.store.votes("split = 'heldout' and choice in ('A', 'B') and "
                                   "(used_by_version is not null or claimed_by is not null)",
                                   order="id desc", limit=self.max_heldout)
        data.heldout = [self._preference(vote) for vote in heldout]
        return data

    # --- helpers -----------------------------------------------------------------------

    def _votes_by_id(self, ids: list[int]) -> list[dict]:
        if not ids:
            return []
        return self.store.votes(f"id in ({','.join('?' * len(ids))})", ids)

    def _ratings_by_id(self, ids: list[int]) -> list[dict]:
        if not ids:
            return []
        return self.store.ratings(f"id in ({','.join('?' * len(ids))})", ids)

    def _replay_items(self) -> list[tuple[str, dict]]:
        if self.replay <= 0:
            return []
        votes = self.store.votes("used_by_version is not null and split = 'train' "
                                 "and choice != 'tie'")
        ratings = self.store.ratings("used_by_version is not null")
        pool = [("vote", v) for v in votes] + [("rating", r) for r in ratings]
        self.rng.shuffle(pool)
        share = self.max_user_share if self.store.feedback_users() > 1 else 1.0
        return fair_pick(pool, lambda item: item[1]["user_id"], self.replay, share)

    def _pair(self, pair_id: str) -> dict:
        if pair_id not in self._pairs:
            self._pairs[pair_id] = self.store.pair(None, pair_id)
        return self._pairs[pair_id]

    def _sample(self, pair_id: str, side: str, advantage: float = 0.0) -> Sample:
        pair = self._pair(pair_id)
        reply = pair["replies"][0 if side == "A" else 1]
        return Sample(reply_id=reply["id"], prompt=pair["prompt_token_ids"],
                      reply=reply["token_ids"], behaviour=reply["token_logprobs"],
                      advantage=advantage, ref=reply["ref_token_logprobs"])

    def _preference(self, vote: dict) -> PreferencePair:
        chosen = vote["choice"]
        rejected = "B" if chosen == "A" else "A"
        return PreferencePair(self._sample(vote["pair_id"], chosen),
                              self._sample(vote["pair_id"], rejected))

    def _add(self, data: RoundData, samples: list[Sample], kind: str, row: dict,
             absolute: dict) -> None:
        """Append the samples one vote or rating gives (and its pair, for DPO)."""
        if kind == "rating":
            key = ("rating", row["id"], row["side"])
            samples.append(self._sample(row["pair_id"], row["side"], absolute[key]))
        elif row["choice"] == "both_bad":
            for side in ("A", "B"):
                key = ("vote", row["id"], side)
                samples.append(self._sample(row["pair_id"], side, absolute[key]))
        elif row["choice"] in PAIRWISE:
            adv_a, adv_b = rloo_advantages(torch.tensor([pair_rewards(row["choice"])]))[0].tolist()
            samples += [self._sample(row["pair_id"], "A", adv_a),
                        self._sample(row["pair_id"], "B", adv_b)]
            data.pairs.append(self._preference(row))
        # a tie: both replies equally good, no policy-gradient term

    def _absolute_advantages(self) -> dict[tuple, float]:
        """Running-baseline advantages of every absolute reward, in the order they were given."""
        events = []
        for vote in self.store.votes("choice = 'both_bad'"):
            for side in ("A", "B"):
                events.append((vote["created_at"], ("vote", vote["id"], side), -1.0))
        for rating in self.store.ratings():
            reward = 1.0 if rating["thumb"] == "up" else -1.0
            events.append((rating["created_at"], ("rating", rating["id"], rating["side"]), reward))
        events.sort(key=lambda e: e[0])
        advantages = running_baseline_advantages([e[2] for e in events])
        return {key: adv for (_, key, _), adv in zip(events, advantages)}
