"""What a round learns from: claimed feedback turned into samples, the new pairs that judge,
and the earlier votes it trains on.

A new pairwise vote (A or B) was cast on replies of the live adapter, which has not trained on
it, so it always judges the live adapter first: the live adapter's agreement with the newest
votes (`judged`), the number the dashboard shows. By default it then trains at once, in this
round, while its replies are still the policy's own: that learned where training one round
later did not (docs/learning.md, `--judge-new`). With `judge_new=True` (test-then-train) a new vote
also judges this round's candidate against the live adapter and trains only from the next
round on, so the gate has votes neither has seen; only the very first votes, with nothing
earlier to train on, train at once.

Training samples are replies with an advantage (see objectives.py): the new votes (or, under
`judge_new`, the votes judged last round), `replay` earlier items drawn at random (every vote
is a person's time and deserves more than one look), and new absolute feedback (thumbs,
"both bad"), which judges nothing and trains at once. Ties give no samples.

A correction (a person's rewrite of a reply) is a demonstration: better than every reply
sampled for that turn, as DITTO treats one (Shaikh et al. 2025, "Show, Don't Tell"). Its item
is the rewrite and the pair's sampled replies with the leave-one-out advantages of rewards
(1, 0, 0): +1 for the rewrite, -1/2 for each sample (-1 for a reply served alone); for DPO, a
pair (rewrite > sample) per sample. It trains at once, and each later round replays the newest
`replay` earlier corrections besides its random replay: a person's rewrite is the strongest
label they give, and there are few of them. A replayed correction is its rewrite alone, with
advantage +1, here: the turn's samples were the policy's a round or more ago, and pushing them
down round after round drives their tokens far below the reference, where the k3 penalty
grows without bound. The learner then gives it replies of its own to be better than, sampled
on its prompt at the live weights (steps.PolicyGradient.add_fresh_replies). The rewrite's tokens
are its text encoded under the chat template (`encode_reply`), cached in the store; it has no
behaviour log-probs (no sampler made it), and no trust region: its term is the seed's
-A log pi, unclipped (see learner/objectives.py).

A round that claims more than `learn_every` new items (the learner fell behind: votes came in
faster than rounds finish) stands for several rounds: it is cut into slices of `learn_every`
new items in the order they came, and the worker trains them slice by slice. It replays one
round's worth of earlier items (`replay` votes and ratings, `replay` corrections), shared
among its slices: a late round that replayed as much per slice as a round of its own would
took as long as all the rounds it stood for, so a learner that fell behind a person who
corrects fell further behind with every round (docs/results.md).

No user holds more than `max_user_share` of the fresh or of the replayed items (see
chatbot/limits.py).

Under `--length-neutral` a pair vote's advantages lose what the replies' lengths alone
predict, from the share of the pair votes finished rounds used that the shorter reply won
(objectives.length_neutral): a person who picks the shorter of two replies that differ in
nothing they care about otherwise teaches length, not what they prefer. With
`--length-neutral-rescale` the shifted advantages are scaled back to a vote's usual weight;
with `--length-window N` each vote's rate is counted over the N newest used votes cast before
it, not over all of them.

Left out: prioritised replay, weighting users by how much they agree with others, a taste for
length per user.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from chatbot.learner_store import FEEDBACK_TABLES
from chatbot.limits import fair_pick
from chatbot.store import Store
from learner.batch import Sample
from learner.objectives import (
    damp_negative,
    length_neutral,
    pair_rewards,
    reply_words,
    rloo_advantages,
    running_baseline_advantages,
    shorter_reply_won,
    trailing_shorter_win_rate,
)

PAIRWISE = ("A", "B")
# Stored pairs the builder keeps in memory (~10 KB each with 64-token replies), the most recently
# used: a replay draws from every earlier vote, and a long-lived learner must not hold them all.
PAIRS_KEPT = 8192


@dataclass
class PreferencePair:
    chosen: Sample
    rejected: Sample

    @property
    def key(self) -> tuple[int, int]:
        return (self.chosen.reply_id, self.rejected.reply_id)


# What one new feedback item says about the replies, for the round's "reward" metric: +1 for a
# preferred reply or a thumbs up, 0 for a tie, -1 for "both bad" or a thumbs down.
FEEDBACK_REWARD = {"A": 1.0, "B": 1.0, "tie": 0.0, "both_bad": -1.0, "up": 1.0, "down": -1.0,
                   "correction": 1.0}
# A correction's Sample.reply_id: CORRECTION_IDS - its id, apart from the stored replies' ids
# (positive) and those of the replies the learner samples itself (-1, -2, ...).
CORRECTION_IDS = -(2**40)


@dataclass
class RoundData:
    # The samples of each feedback item (a vote's two replies stay together), oldest first.
    new_items: list[list[Sample]] = field(default_factory=list)  # this round's feedback
    replay_items: list[list[Sample]] = field(default_factory=list)  # earlier feedback
    pairs: list[PreferencePair] = field(default_factory=list)  # what DPO trains on
    judged: list[PreferencePair] = field(default_factory=list)  # the new A/B votes
    judge_only: bool = False  # True: `judged` is kept out of this round's training
    scored_samples: list[Sample] = field(default_factory=list)  # sampled, scored by the RM
    rewards: list[float] = field(default_factory=list)  # FEEDBACK_REWARD of each new item
    replayed_items: int = 0  # earlier votes and ratings trained on this round
    slices: int = 1  # the rounds of `learn_every` new items this round stands for
    shorter_wins: float | None = None  # under --length-neutral: the newest votes' rate

    @property
    def new_samples(self) -> list[Sample]:
        return [s for item in self.new_items for s in item]

    @property
    def replay_samples(self) -> list[Sample]:
        return [s for item in self.replay_items for s in item]

    @property
    def judged_samples(self) -> list[Sample]:
        """The replies of the judged pairs, chosen then rejected."""
        return [s for p in self.judged for s in (p.chosen, p.rejected)]

    @property
    def samples(self) -> list[Sample]:
        """What the policy gradient trains on."""
        return self.new_samples + self.replay_samples + self.scored_samples

    def sliced_samples(self) -> list[list[Sample]]:
        """The policy-gradient samples cut into `slices` parts: the new items in the order they
        came, each part with its share of the replayed items and of the scored samples. A
        learner that fell behind (votes come faster than rounds finish) then trains slice by
        slice as the rounds it missed would have, each slice with its own trust region, instead
        of taking every step on one big batch (see steps.PolicyGradient.schedule)."""
        k = self.slices

        def share(items: list, i: int) -> list:  # the i-th of k near-equal consecutive parts
            n = len(items)
            return items[i * n // k:(i + 1) * n // k]

        parts = []
        for i in range(k):
            part = [s for item in share(self.new_items, i) + share(self.replay_items, i)
                    for s in item] + share(self.scored_samples, i)
            if part:
                parts.append(part)
        return parts


class RoundBuilder:
    """Reads the store and assembles one round's RoundData."""

    def __init__(self, store: Store, replay: int, judge_new: bool = False,
                 max_user_share: float = 1.0, rng: random.Random | None = None,
                 negative_weight: float = 1.0, learn_every: int | None = None,
                 encode_reply: Callable[[str], list[int]] | None = None,
                 length_neutral: float = 0.0, length_neutral_rescale: bool = False,
                 length_window: int = 0) -> None:
        self.store = store
        self.length_neutral = length_neutral  # 0: a pair vote's advantages as they are
        self.length_neutral_rescale = length_neutral_rescale  # see objectives.length_neutral
        self.length_window = length_window  # see objectives.trailing_shorter_win_rate
        self.encode_reply = encode_reply  # a rewrite's text -> its reply token ids
        self.learn_every = learn_every  # None: a round is one slice, however many items
        self.negative_weight = negative_weight
        self.replay = replay
        self.judge_new = judge_new
        self.max_user_share = max_user_share
        self.rng = rng or random.Random()
        # pair_id -> the stored pair, read once and kept while among the PAIRS_KEPT last used
        self._pairs: OrderedDict[str, dict] = OrderedDict()
        self._replies: dict[int, dict] = {}  # reply_id -> its reply in `_pairs`
        self._drawn: tuple[tuple, list[tuple[str, int]]] | None = None  # see _draw
        # correction id -> (token ids, reference log-probs or None) of the rewrite
        self._rewrites: dict[int, tuple[list[int], list[float] | None]] = {}
        # (used vote ids, (vote id, did the shorter reply win) of those of different lengths)
        self._length_outcomes_of: tuple[tuple, list[tuple[int, bool]]] | None = None

    def build(self, claimed: dict[str, list[int]]) -> RoundData:
        absolute = self._absolute_advantages()
        data = RoundData()
        earlier = self.store.used_feedback("votes")
        if self.length_neutral:
            self._read_length_outcomes(earlier)
            data.shorter_wins = self._shorter_wins(None)
        judge = self.judge_new and any(v["choice"] in PAIRWISE for v in earlier)
        data.judge_only = judge
        for vote in self.store.feedback_by_id("votes", claimed["votes"]):
            if vote["choice"] in PAIRWISE:
                data.judged.append(self._preference(vote))
            if not (judge and vote["choice"] in PAIRWISE):
                self._add(data, data.new_items, "vote", vote, absolute)
            data.rewards.append(FEEDBACK_REWARD[vote["choice"]])
        for rating in self.store.feedback_by_id("ratings", claimed["ratings"]):
            self._add(data, data.new_items, "rating", rating, absolute)
            data.rewards.append(FEEDBACK_REWARD[rating["thumb"]])
        for correction in self.store.corrections(ids=claimed.get("corrections", [])):
            self._add(data, data.new_items, "correction", correction, absolute)
            data.rewards.append(FEEDBACK_REWARD["correction"])
        if self.learn_every:
            data.slices = max(1, math.ceil(len(data.rewards) / self.learn_every))
        # One round's worth of replay, however many slices (see the module's docstring).
        for kind, row in self._earlier_items(earlier, fresh_too=judge, replay=self.replay):
            self._add(data, data.replay_items, kind, row, absolute)
            data.replayed_items += 1
        return data

    def draft(self) -> RoundData:
        """The round the pending feedback would make if it were claimed now, with the replay
        that round will draw (see _draw): what the learner can start on before it comes."""
        pending = {kind: [row["id"] for row in self.store.pending_feedback(kind)]
                   for kind in FEEDBACK_TABLES}
        return self.build(pending)

    def remember_reference(self, reply_id: int, logprobs: list[float]) -> None:
        """A reply's reference log-probs, computed after its pair was read (and cached in the
        store too): later samples of that reply carry them, not the pair's stale None (which
        had every replayed reply's reference computed again, round after round)."""
        if reply_id in self._replies:
            self._replies[reply_id]["ref_token_logprobs"] = logprobs
        elif CORRECTION_IDS - reply_id in self._rewrites:  # kept here only, not in the store
            tokens, _ = self._rewrites[CORRECTION_IDS - reply_id]
            self._rewrites[CORRECTION_IDS - reply_id] = (tokens, logprobs)

    def voted_pairs(self) -> list[PreferencePair]:
        """Every pairwise vote a finished round has used, and every used correction against
        each of its pair's samples: what a reward model may learn from (the round's new votes
        are not among them: they judge)."""
        return ([self._preference(v) for v in self.store.used_feedback("votes")
                 if v["choice"] in PAIRWISE]
                + [pair for c in self.store.used_feedback("corrections")
                   for pair in self._correction_pairs(c)])

    # --- helpers -----------------------------------------------------------------------

    def _earlier_items(self, earlier: list[dict], fresh_too: bool,
                       replay: int) -> list[tuple[str, dict]]:
        """The votes the last round judged (if they wait to be trained on), then `replay`
        random other earlier items; ties teach nothing and are skipped."""
        used_votes = len(earlier)  # ties too: a round of ties is a new round all the same
        earlier = [v for v in earlier if v["choice"] != "tie"]
        share = self.max_user_share if self.store.feedback_users() > 1 else 1.0
        picked: list[tuple[str, dict]] = []
        last = max((v["used_by_version"] for v in earlier), default=None)
        if fresh_too and last is not None:
            fresh = [("vote", v) for v in earlier if v["used_by_version"] == last]
            picked = fair_pick(fresh, lambda item: item[1]["user_id"], len(fresh), share)
        if replay > 0:
            taken = {row["id"] for kind, row in picked}
            pool = [("vote", v) for v in earlier if v["id"] not in taken]
            pool += [("rating", r) for r in self.store.used_feedback("ratings")]
            picked += self._draw(pool, replay, share, used_votes)
            corrections = self.store.used_feedback("corrections")
            picked += [("rewrite", c) for c in fair_pick(
                corrections[::-1], lambda row: row["user_id"], replay, share)]
        return picked

    def _draw(self, pool: list[tuple[str, dict]], replay: int, share: float,
              used_votes: int) -> list[tuple[str, dict]]:
        """`replay` items of the pool at random, the same ones for as long as the pool and the
        request stay the same: the learner draws the next round's replay when the last round
        ends, to start on it (learner/head_start.py), and the round then trains on that draw."""
        key = (tuple((kind, row["id"]) for kind, row in pool), replay, share, used_votes)
        if self._drawn is None or self._drawn[0] != key:
            shuffled = list(pool)
            self.rng.shuffle(shuffled)
            picked = fair_pick(shuffled, lambda item: item[1]["user_id"], replay, share)
            self._drawn = (key, [(kind, row["id"]) for kind, row in picked])
        by_key = {(kind, row["id"]): (kind, row) for kind, row in pool}
        return [by_key[item] for item in self._drawn[1]]

    def _pair(self, pair_id: str) -> dict:
        if pair_id in self._pairs:
            self._pairs.move_to_end(pair_id)
            return self._pairs[pair_id]
        pair = self._pairs[pair_id] = self.store.pair(None, pair_id)
        self._replies.update((reply["id"], reply) for reply in pair["replies"])
        if len(self._pairs) > PAIRS_KEPT:  # read again from the store if it is needed again
            _, dropped = self._pairs.popitem(last=False)
            for reply in dropped["replies"]:
                self._replies.pop(reply["id"], None)
        return pair

    def _sample(self, pair_id: str, side: str, advantage: float = 0.0) -> Sample:
        pair = self._pair(pair_id)
        reply = pair["replies"][0 if side == "A" else 1]
        return Sample(reply_id=reply["id"], prompt=pair["prompt_token_ids"],
                      reply=reply["token_ids"], behaviour=reply["token_logprobs"],
                      advantage=advantage, ref=reply["ref_token_logprobs"])

    def _rewrite(self, correction: dict, advantage: float = 0.0) -> Sample:
        """The correction's rewrite as a sample of its pair's prompt."""
        pair = self._pair(correction["pair_id"])
        if correction["id"] not in self._rewrites:
            tokens = correction["token_ids"]
            if tokens is None:
                assert self.encode_reply is not None, "a correction needs encode_reply"
                tokens = self.encode_reply(correction["text"])
                self.store.cache_correction_tokens(correction["id"], tokens)
            self._rewrites[correction["id"]] = (tokens, None)
        tokens, ref = self._rewrites[correction["id"]]
        return Sample(reply_id=CORRECTION_IDS - correction["id"],
                      prompt=pair["prompt_token_ids"], reply=tokens, behaviour=None,
                      advantage=advantage, ref=ref)

    def _correction_pairs(self, correction: dict) -> list[PreferencePair]:
        """(rewrite > sample) for each reply sampled for the corrected turn."""
        sides = [r["side"] for r in self._pair(correction["pair_id"])["replies"]]
        return [PreferencePair(self._rewrite(correction), self._sample(correction["pair_id"], s))
                for s in sides]

    def _preference(self, vote: dict) -> PreferencePair:
        chosen = vote["choice"]
        rejected = "B" if chosen == "A" else "A"
        return PreferencePair(self._sample(vote["pair_id"], chosen),
                              self._sample(vote["pair_id"], rejected))

    def _add(self, data: RoundData, items: list[list[Sample]], kind: str, row: dict,
             absolute: dict) -> None:
        """Append the samples one vote or rating gives, as one item (and its pair, for DPO)."""
        if kind == "correction":
            sides = [r["side"] for r in self._pair(row["pair_id"])["replies"]]
            rewards = torch.tensor([[1.0] + [0.0] * len(sides)])
            first, *rest = rloo_advantages(rewards)[0].tolist()
            items.append([self._rewrite(row, first)]
                         + [self._sample(row["pair_id"], side,
                                         damp_negative(adv, self.negative_weight))
                            for side, adv in zip(sides, rest)])
            data.pairs.extend(self._correction_pairs(row))
        elif kind == "rewrite":  # a correction replayed: see the module's docstring
            items.append([self._rewrite(row, FEEDBACK_REWARD["correction"])])
            data.pairs.extend(self._correction_pairs(row))
        elif kind == "rating":
            key = ("rating", row["id"], row["side"])
            items.append([self._sample(row["pair_id"], row["side"], absolute[key])])
        elif row["choice"] == "both_bad":
            items.append([self._sample(row["pair_id"], side, absolute[("vote", row["id"], side)])
                          for side in ("A", "B")])
        elif row["choice"] in PAIRWISE:
            advantages = rloo_advantages(torch.tensor([pair_rewards(row["choice"])]))[0].tolist()
            if data.shorter_wins is not None:
                texts = [reply["text"] or "" for reply in self._pair(row["pair_id"])["replies"]]
                shorter_wins = self._shorter_wins(row["id"])
                advantages = length_neutral(tuple(advantages), tuple(map(reply_words, texts)),
                                            shorter_wins, self.length_neutral,
                                            rescale=self.length_neutral_rescale)
            adv_a, adv_b = (damp_negative(a, self.negative_weight) for a in advantages)
            items.append([self._sample(row["pair_id"], "A", adv_a),
                          self._sample(row["pair_id"], "B", adv_b)])
            data.pairs.append(self._preference(row))
        # a tie: both replies equally good, no policy-gradient term

    def _read_length_outcomes(self, used_votes: list[dict]) -> None:
        """Whether the shorter reply won each pair vote finished rounds used (between replies
        of different lengths): what `_shorter_wins` counts. Used votes only: the rates stay
        the same from the end of one round to the next, so the draft the learner starts on
        between rounds (learner/head_start.py) has the advantages the round will have; and
        the votes are read again only when they change."""
        key = tuple(vote["id"] for vote in used_votes)
        if self._length_outcomes_of is None or self._length_outcomes_of[0] != key:
            outcomes = [(vote_id, won) for vote_id, *vote in self.store.used_vote_texts()
                        if (won := shorter_reply_won(*vote)) is not None]
            self._length_outcomes_of = (key, outcomes)

    def _shorter_wins(self, vote_id: int | None) -> float:
        """The share of the used pair votes the shorter reply won, shrunk toward a half, as
        vote `vote_id`'s shift reads it: over all of them, or with --length-window over the
        newest cast before it (objectives.trailing_shorter_win_rate; None: before any vote no
        round has used yet)."""
        assert self._length_outcomes_of is not None, "build reads the outcomes first"
        return trailing_shorter_win_rate(self._length_outcomes_of[1], vote_id,
                                         self.length_window)

    def _absolute_advantages(self) -> dict[tuple, float]:
        """Running-baseline advantages of every absolute reward, in the order they were given."""
        events = []
        for vote in self.store.votes(choice="both_bad"):
            for side in ("A", "B"):
                events.append((vote["created_at"], ("vote", vote["id"], side), -1.0))
        for rating in self.store.ratings():
            reward = 1.0 if rating["thumb"] == "up" else -1.0
            events.append((rating["created_at"], ("rating", rating["id"], rating["side"]), reward))
        events.sort(key=lambda e: e[0])
        advantages = running_baseline_advantages([e[2] for e in events])
        return {key: adv for (_, key, _), adv in zip(events, advantages)}
