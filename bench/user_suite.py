"""The API-level user suite (`python -m bench api-user --suite NAME`): users x seeds x paces x
arms of bench/api_user.py's run, each run alone, kept as it finishes; its table, plot and
headline.

    python -m bench api-user --suite corrections-reader
    python -m bench api-user --suite length-neutral-reader --summarize
    python -m bench api-user --suite unseen-reader-64-wide --read-base
    python -m bench api-user --suite unseen-varied-reader-64-wide --suite-users long-word

A suite's users are preferences in a fifth to a half of the base model's replies, as
`python -m bench feature-share` measured them (bench/results/feature-share.json); it refuses
a user outside that range, or not measured, and says why. Each run is kept in the suite's
folder as it finishes, and a rerun skips the runs already there (`--summarize` writes the
table from the runs kept so far; `--suite-users` makes only the named users' runs, so that
one user's seeds can come first). The base model's held-out replies of a seed are read once,
by the seed's first run, and every user of that seed is scored on the same texts (the arms
are then compared on one baseline); a run's `before_from` says which run read them.
`--read-base` reads them again on this machine with the learner off and sets them beside the
kept ones (`read_base`): a suite run on another CPU than the one that read its replies before
sees the engine's part of a change there.

A suite may try a rule: `extra` flags for app.py, and `against`, a suite without the rule
(with fewer flags) whose runs it is read beside, user by user and seed by seed, on the same
held-out replies before (`length-neutral-reader` against `corrections-reader`'s votes-only
arm; `candidates-reader`, which adds --pair-candidates 4, against `length-neutral-reader`;
`defaults-reader`, the product's defaults, against `corrections-neutral-reader`, whose flag
became a default; `defaults-reader-64`, both its arms at 64 interactions, against it;
`varied-reader-64`, whose users' rewrites vary, against that; `rescaled-reader-64`, which
adds --length-neutral-rescale to votes only, against it too; `bounded-instant-64`, which
bounds the loss's two unbounded terms, against `defaults-instant-64`, as does
`rounds-of-4-instant-64`, which trains the instant voter's votes in rounds of 4, and
`self-samples-instant-64`, `judge-new-instant-64` and `steps-4-instant-64`;
`rerun-instant-64-wide`, the same rule on later code, against `defaults-instant-64-wide`,
and `rerun-instant-64-wide-normal`, the learner child niced instead of in the idle class,
against it; `final-instant-64-wide`, the server on one thread while its learner trains,
against that, and `final-reader-64-wide` against `defaults-reader-64-wide`;
`bounded-instant-64-wide`, the bounded loss, against `final-instant-64-wide`, and
`bounded-reader-64-wide` against `final-reader-64-wide`; `half-neutral-reader-64-wide`
and `half-neutral-instant-64-wide`, length-neutral votes at half strength, against the
bounded ones; `window-reader-64-wide`, the length rate over each vote's 16 newest
predecessors, against `unseen-reader-64-wide`; `backtrack-varied-reader-64-wide`, the line
search on the KL tripwire with beta doubled at each trip, and `line-search-varied-reader-64-wide`,
the line search alone, against `unseen-varied-reader-64-wide`).
Every suite of a chain of `against` reads its held-out replies before from the suite at the
chain's end; a suite at another pace names the suite whose replies before it reads in
`reads_before_of` instead (`defaults-instant-64`, votes only from a user who votes at once,
and `varied-instant-64` and `varied-instant-64-more`, users correcting every 8, read
`defaults-reader-64`'s; `unseen-reader-64-wide` and `unseen-instant-64-wide`, users picked
after the rule was set, and `unseen-varied-reader-64-wide`, the same users correcting every 8,
read `defaults-reader-64-wide`'s), and is not paired with it. A
server that chooses its pairs from candidates is asked for its held-out replies one at a
time: its pairs are not two samples of its policy. A suite with more held-out replies a
prompt (`eval_replies`: the `-wide` suites, 8 where the rest have 2) reads its own replies
before and is read beside the others by hand.

The table also splits each run's gain into what the replies' lengths alone explain and the
rest (`gain_by_length`, from bench/api_user.py's `share_at_length`; computed from the kept
replies for runs made before it was).

The headline: per arm and pace, the share of runs significant at 5% (by the pooled test, and
with each held-out prompt a stratum) and the mean gain with its 95% t-interval (for an arm
with corrections, also with the user's correction sentence taken out of the replies after: a
model that copies it verbatim satisfies the user by copying); each arm with corrections minus
votes only, paired; and, for a suite tried against another, its gain minus the other's,
paired.

Left out: running several runs at once (each must have the machine to itself).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from bench.api_user import (
    one_sided_p,
    read_held_out,
    run_one,
    run_settings,
    scored,
    share_at_length,
    stratified_p,
    summary,
)
from bench.common import RESULTS, BadRequest, git_commit, machine, write_result
from bench.oracles import make_oracle

CONTRACTIONS = (r"re:\b(\w+n't|I'm|I'd|I'll|I've|you're|you'll|you've|we're|we'll|they're|"
                r"it's|that's|there's|here's|let's|what's)\b")
# The users a suite may name: their preference, and the sentences they put first when they fix
# a reply (each has the feature). A suite's user puts the first one first in every rewrite; in
# a suite with `varied` corrections, one of them drawn at random for each rewrite, as a
# person's rewrites vary. `noisy-NAME` is NAME with 20% of its votes flipped.
USERS = {
    "contractions": (CONTRACTIONS, ("That's a good question.", "Here's the short version.",
                                    "It's simpler than it looks.", "Let's go through it.",
                                    "I'd start with the basics.", "There's more to it.")),
    "can": ("can", ("Here is what I can tell you.", "I can help with that.",
                    "Most people can do this.", "This can work in a few ways.",
                    "We can start with the main point.", "Anyone can learn this.")),
    "you": ("you", ("Here is an answer for you.", "You asked a good question.",
                    "This should help you.", "Here is what your question needs.",
                    "Let me show you how.", "You will find this useful.")),
    "numbers": ("numbers", ("There are two sides to this.", "Here are three points.",
                            "First, the main idea.", "Let me give one example.",
                            "It comes down to 2 things.", "The answer has four parts.")),
    # Users picked after the rule was set, from features no run had tried (the unseen-* suites):
    # a word of 12 letters or more, a reply that opens with "The", "This" or "It", the first
    # person, and the word "for".
    "long-word": (r"re:\b\w{12,}\b", ("Here is a straightforward answer.",
                                      "Understanding this takes a little background.",
                                      "Communication matters here.", "The relationship is simple.",
                                      "Unfortunately there is no single answer.",
                                      "Here is a comprehensive overview.")),
    "opener": (r"re:^(The|This|It)\b", ("The short answer is yes.",
                                        "This depends on a few things.",
                                        "It helps to start simple.", "The main idea is simple.",
                                        "This is a common question.",
                                        "It comes down to practice.")),
    "first-person": (r"re:\b(I|me|my|we|our|us)\b", ("I can explain this.", "Let me explain.",
                                                    "In my view, it is simple.",
                                                    "We can look at it together.",
                                                    "Here is our answer.",
                                                    "Let us start with the basics.")),
    "for": (r"re:\bfor\b", ("Thanks for asking.", "Here is a tip for beginners.",
                             "For example, consider this.", "This works for most people.",
                             "Here is what to look for.", "For a start, keep it simple.")),
}
SHARE_RANGE = (0.2, 0.5)  # the learning claim's range of base-model feature shares
# Where the base model's feature shares were measured: the first users' run, and the run that
# picked the unseen-* suites' users: of 41 features tried in two runs (the other run, of 18
# rarer ones, is feature-share-unseen-rare.json), these four fell in SHARE_RANGE. A feature
# in both files takes the first file's share.
FEATURE_SHARES = (RESULTS / "feature-share.json", RESULTS / "feature-share-unseen.json")


@dataclass(frozen=True)
class Suite:
    users: tuple[str, ...]
    seeds: tuple[int, ...]
    correct_every: tuple[int, ...]  # the arms: 0 = votes only
    paces: tuple[str, ...] = ("instant",)
    interactions: int = 32
    eval_replies: int = 2  # per held-out prompt, before and after
    extra: tuple[str, ...] = ()  # flags for app.py: the rule this suite tries
    varied: bool = False  # each correction's sentence drawn from the user's; else the first
    # A suite this one is paired with (same users, seeds, paces and arms, without the rule this
    # one adds): the held-out replies before are reused (from the end of the chain of
    # `against`), and the headline reports the gain minus theirs.
    against: str | None = None
    # A suite whose held-out replies before this one reuses without being paired with it
    # (other paces: no run of the same user, seed and pace to pair with).
    reads_before_of: str | None = None


SUITES = {
    "corrections": Suite(("contractions", "can", "you", "noisy-numbers"), (0, 1), (0, 8)),
    "corrections-quick": Suite(("contractions", "can"), (0,), (0, 8)),
    "corrections-reader": Suite(("contractions", "can", "you", "noisy-numbers"), (0, 1), (0, 8),
                                paces=("reader",)),
    "length-neutral-reader": Suite(("contractions", "can", "you", "noisy-numbers"), (0, 1), (0,),
                                   paces=("reader",), extra=("--length-neutral", "1"),
                                   against="corrections-reader"),
    "candidates-reader": Suite(("contractions", "can", "you", "noisy-numbers"), (0, 1), (0,),
                               paces=("reader",),
                               extra=("--length-neutral", "1", "--pair-candidates", "4"),
                               against="length-neutral-reader"),
    "corrections-neutral-reader": Suite(("contractions", "can", "you", "noisy-numbers"), (0, 1),
                                        (8,), paces=("reader",),
                                        extra=("--length-neutral", "1"),
                                        against="corrections-reader"),
    # The product's defaults (length-neutral votes since stop 40), both arms: corrections
    # first, then votes only, each arm over every user and seed before the next.
    "defaults-reader": Suite(("contractions", "can", "you", "noisy-numbers"), (0, 1), (8, 0),
                             paces=("reader",), against="corrections-neutral-reader"),
    # The bar: the defaults at 64 interactions, with a correction every 8 and then
    # votes only, each arm read beside the same arm at 32 (the gain of 32 more interactions).
    "defaults-reader-64": Suite(("contractions", "can", "you", "noisy-numbers"), (0, 1), (8, 0),
                                paces=("reader",), interactions=64,
                                against="defaults-reader"),
    # Its corrections arm with a user whose rewrites vary: each puts one of six sentences
    # first, drawn at random, where defaults-reader-64's user put the same one every time
    # (and the model learned to copy it).
    "varied-reader-64": Suite(("contractions", "can", "you", "noisy-numbers"), (0, 1), (8,),
                              paces=("reader",), interactions=64, varied=True,
                              against="defaults-reader-64"),
    # Its votes-only arm with length-neutral votes scaled back to a vote's usual weight: the
    # two runs that missed at 64 had the highest share of votes won by the shorter reply, so
    # the smallest advantages after the length shift, and spent the least KL.
    "rescaled-reader-64": Suite(("contractions", "can", "you", "noisy-numbers"), (0, 1), (0,),
                                paces=("reader",), interactions=64,
                                extra=("--length-neutral-rescale",),
                                against="defaults-reader-64"),
    # The bar's instant half: the defaults, votes only, at 64 interactions from a user who
    # votes the moment a pair appears (the learner falls behind and trains in slices). Its two
    # users are the two the reader-pace votes-only arm missed on seed 0: the hardest known.
    "defaults-instant-64": Suite(("you", "noisy-numbers"), (0, 1), (0,), paces=("instant",),
                                 interactions=64, reads_before_of="defaults-reader-64"),
    # The same runs measured with four times the held-out replies (8 per prompt, read afresh,
    # so on no other suite's replies before): five votes-only rules each gave these runs
    # about +0.12, which 2 replies per prompt see at 5% about two times in five; whether the
    # gain is there in every run or only in some.
    "defaults-instant-64-wide": Suite(("you", "noisy-numbers"), (0, 1), (0,),
                                      paces=("instant",), interactions=64, eval_replies=8),
    # The reader-pace votes-only arm at 64 with 8 held-out replies a prompt: the bar's reader
    # half measured finely enough to see +0.1. Its first two runs were the two that
    # defaults-reader-64 missed ("you" s0 +0.10, p = 0.135; noisy numbers s0 fell 0.44 ->
    # 0.31); the suite resumes with the other six.
    "defaults-reader-64-wide": Suite(("you", "noisy-numbers", "contractions", "can"), (0, 1),
                                     (0,), paces=("reader",), interactions=64, eval_replies=8),
    # Its two unbounded loss terms bounded (a ratio past the clip on a negative advantage,
    # and the k3 of a token far below the base: docs/learning.md), each of which can take a
    # step's whole clipped gradient norm.
    "bounded-instant-64": Suite(("you", "noisy-numbers"), (0, 1), (0,), paces=("instant",),
                                interactions=64,
                                extra=("--dual-clip", "3", "--kl-linear-beyond", "3"),
                                against="defaults-instant-64"),
    # The same votes trained in real rounds of 4 (--max-batch-votes 4) instead of slices of
    # rounds of up to 16: whether the slice emulation of missed rounds is what the instant
    # voter loses (the pairs voted on are as old either way).
    "rounds-of-4-instant-64": Suite(("you", "noisy-numbers"), (0, 1), (0,), paces=("instant",),
                                    interactions=64, extra=("--max-batch-votes", "4"),
                                    against="defaults-instant-64"),
    # The two rules the issue asks this suite to judge, each beside the defaults: the reward
    # model's self-samples (four fresh pairs a round from the learner's own weights, scored by
    # a Bradley-Terry model fitted on the votes: on-policy pairs the instant voter's stale
    # ones are not) and test-then-train (each new vote judges the candidate first and trains
    # a round later).
    "self-samples-instant-64": Suite(("you", "noisy-numbers"), (0, 1), (0,),
                                     paces=("instant",), interactions=64,
                                     extra=("--self-samples", "4"),
                                     against="defaults-instant-64"),
    "judge-new-instant-64": Suite(("you", "noisy-numbers"), (0, 1), (0,), paces=("instant",),
                                  interactions=64, extra=("--judge-new",),
                                  against="defaults-instant-64"),
    # Twice the steps per vote: these users' policies ended 0.16-0.33 nats per token from the
    # base, under the KL budget (0.2 before beta rises) and the tripwire (0.5): whether the
    # votes are under-used rather than too few.
    "steps-4-instant-64": Suite(("you", "noisy-numbers"), (0, 1), (0,), paces=("instant",),
                                interactions=64, extra=("--steps-per-round", "4"),
                                against="defaults-instant-64"),
    # The instant voter who also corrects: varied-reader-64's arm (a correction every 8, the
    # rewrites varied) at the instant pace, read beside defaults-instant-64's votes alone (no
    # run of the same arm to pair with): whether the strongest label carries the fast voter.
    "varied-instant-64": Suite(("you", "noisy-numbers"), (0, 1), (8,), paces=("instant",),
                               interactions=64, varied=True,
                               reads_before_of="defaults-reader-64"),
    # The same for the suite's other two users: whether it holds beyond the two hardest.
    "varied-instant-64-more": Suite(("contractions", "can"), (0, 1), (8,), paces=("instant",),
                                    interactions=64, varied=True,
                                    reads_before_of="defaults-reader-64"),
    # defaults-instant-64-wide again, on later code (the server's LoRA update form chosen per
    # CPU, the pair kernels' early decision) and another CPU: whether the instant voter's half
    # of the bar holds on the code as it is. Paired with it on the same replies before.
    "rerun-instant-64-wide": Suite(("you", "noisy-numbers"), (0, 1), (0,), paces=("instant",),
                                   interactions=64, eval_replies=8,
                                   against="defaults-instant-64-wide"),
    # The same with the learner child in the usual scheduling class at nice 10, as before
    # 0245ba7 (chatbot/learner_process.py): whether the idle class, which leaves the learner
    # only the time between an instant voter's pairs, changes what it learns.
    "rerun-instant-64-wide-normal": Suite(("you", "noisy-numbers"), (0, 1), (0,),
                                          paces=("instant",), interactions=64, eval_replies=8,
                                          extra=("--learner-sched", "normal"),
                                          against="rerun-instant-64-wide"),
    # The server on one thread while its learner trains (app.py server_share: the learner
    # child counts as a busy neighbour, as any process does), the defaults otherwise: the
    # learner gets a core of its own while the instant voter's pairs stream. Paired with
    # rerun-instant-64-wide-normal, the same defaults before that change.
    "final-instant-64-wide": Suite(("you", "noisy-numbers"), (0, 1), (0,), paces=("instant",),
                                   interactions=64, eval_replies=8,
                                   against="rerun-instant-64-wide-normal"),
    # bounded-instant-64's flags on final-instant-64-wide's runs, read on 8 replies a prompt:
    # in that suite the same token of one rejected reply took a round's whole step twice
    # (a ratio of e^8 past the clip, then 16 nats below the base: terms 5,288 and 640,461),
    # and bounded-instant-64, read on 2, could not see a gain of +0.05.
    "bounded-instant-64-wide": Suite(("you", "noisy-numbers"), (0, 1), (0,),
                                     paces=("instant",), interactions=64, eval_replies=8,
                                     extra=("--dual-clip", "3", "--kl-linear-beyond", "3"),
                                     against="final-instant-64-wide"),
    # defaults-reader-64-wide again on the code as it is (the change above, the server's LoRA
    # update form per CPU, the bench's polling), on the same replies before.
    "final-reader-64-wide": Suite(("you", "noisy-numbers", "contractions", "can"), (0, 1),
                                  (0,), paces=("reader",), interactions=64, eval_replies=8,
                                  against="defaults-reader-64-wide"),
    # The bounded loss at a reader's pace, paired with final-reader-64-wide's runs on the same
    # replies before: whether the bounds that tame the instant voter's spikes cost the reader
    # anything (seed 0 was run first, before they became the default for both; seed 1 is the
    # default's own reader half).
    "bounded-reader-64-wide": Suite(("you", "noisy-numbers", "contractions", "can"), (0, 1),
                                    (0,), paces=("reader",), interactions=64, eval_replies=8,
                                    extra=("--dual-clip", "3", "--kl-linear-beyond", "3"),
                                    against="final-reader-64-wide"),
    # Half-strength length-neutral votes (--length-neutral 0.5) on the bounded default's
    # runs, same replies before: the simulated suite at 0.5 gained more of the feature than
    # at 1 in the mean over six runs (not resolved: paired +0.06 [-0.19, +0.30] at 64) and
    # let a brevity preference shorten replies (docs/results.md); whether the users
    # of these suites, whose tie-break taught brevity in place of their feature at 0, keep
    # their gain at 0.5. Seed 0 (docs/results.md): all four significant, the gain lower on
    # three, the replies shorter on two and the KL at the tripwire; seed 1 not run. Like the
    # suites they are read beside, without the line search on the tripwire (--no-kl-backtrack).
    "half-neutral-reader-64-wide": Suite(("you", "noisy-numbers", "contractions", "can"),
                                         (0, 1), (0,), paces=("reader",), interactions=64,
                                         eval_replies=8,
                                         extra=("--length-neutral", "0.5", "--no-kl-backtrack"),
                                         against="bounded-reader-64-wide"),
    "half-neutral-instant-64-wide": Suite(("you", "noisy-numbers"), (0, 1), (0,),
                                          paces=("instant",), interactions=64, eval_replies=8,
                                          extra=("--length-neutral", "0.5", "--no-kl-backtrack"),
                                          against="bounded-instant-64-wide"),
    # defaults-reader-64-wide with the server sampling in llama.cpp (--engine llama-cpp,
    # chatbot/llama_engine.py): its pairs and its held-out replies drawn there, the learner
    # unchanged. Seed 0, every user: whether the loop learns as well through the faster engine.
    "llama-reader-64-wide": Suite(("you", "noisy-numbers", "contractions", "can"), (0,), (0,),
                                  paces=("reader",), interactions=64, eval_replies=8,
                                  extra=("--engine", "llama-cpp")),
    # The product's defaults for users picked after the rule was set (USERS' last four), as
    # the check with preferences nobody has seen will be: scored on the same held-out
    # replies before as defaults-reader-64-wide and the suites paired with it. Both seeds
    # (docs/results.md): 6 of 8 significant, 7 of 8 by prompt; long-word missed on both
    # (p = 0.050 and 0.079, +0.06 each).
    "unseen-reader-64-wide": Suite(("long-word", "opener", "first-person", "noisy-for"), (0, 1),
                                   (0,), paces=("reader",), interactions=64, eval_replies=8,
                                   reads_before_of="defaults-reader-64-wide"),
    # The bar's instant half for them: two of the four, the one the reader's pace learnt least
    # (long-word, seed 0) and the noisy annotator, voting as soon as a pair appears; the same
    # held-out replies before. Both seeds (docs/results.md): 3 of 4 significant; long-word
    # +0.05 on seed 0 and +0.11 (p = 0.005) on seed 1.
    "unseen-instant-64-wide": Suite(("long-word", "noisy-for"), (0, 1), (0,),
                                    paces=("instant",), interactions=64, eval_replies=8,
                                    reads_before_of="defaults-reader-64-wide"),
    # A rule on trial (docs/learning.md): the length-neutral shift's rate counted over the 16
    # newest used votes cast before each vote, not all of them (--length-window), against
    # the defaults on the same users, seeds and held-out replies before. Why: in opener s0 the
    # rate over all votes climbed 0.55 -> 0.82 over the run and its replies shortened to 0.86.
    # Stopped after seed 0's first two runs (docs/results.md): opener 0.32 -> 0.91 at 0.97 of
    # the words, long-word 0.27 -> 0.25 at 0.77; the rule stays off.
    # The corrections arm for them at a reader's pace: a correction every 8 interactions, each
    # rewrite putting one of the user's six sentences first (varied-reader-64's arm, which
    # was 8 of 8 on the first four users), scored on the same held-out replies before as
    # unseen-reader-64-wide, whose votes-only runs it is read beside by hand (another arm:
    # not paired by the suite). Why: votes alone missed the word of 12+ letters on both
    # seeds, a feature spread over thousands of words, and a rewrite is the one label that
    # shows the model such a word in a reply of its own. The runs (docs/results.md):
    # long-word 0.27 -> 0.43 on seed 0 (0.35 less the sentences: one was copied into 36
    # replies) and 0.30 -> 0.30 on seed 1; opener s0 0.32 -> 0.88; the learner fell 2-3
    # rounds behind (vote-to-live 98-132 s) on the AVX2-only EPYC. Then, on the one-round
    # replay of a late round and the AVX-512 BF16 EPYC: first-person 0.24 -> 0.68 and
    # 0.20 -> 0.73, noisy-for 0.24 -> 0.57 and 0.23 -> 0.44, 5-7 rounds of each rejected at
    # the KL tripwire; opener s1 0.42 -> 0.80: 7 of 8 significant. Its runs were made before
    # the line search on the tripwire became the default, and the suite names the rule they
    # ran (--no-kl-backtrack).
    "unseen-varied-reader-64-wide": Suite(("long-word", "opener", "first-person", "noisy-for"),
                                          (0, 1), (8,), paces=("reader",), interactions=64,
                                          eval_replies=8, varied=True,
                                          extra=("--no-kl-backtrack",),
                                          reads_before_of="defaults-reader-64-wide"),
    # (Like the suite it is read beside, made without the line search: --no-kl-backtrack.)
    "window-reader-64-wide": Suite(("long-word", "opener", "first-person", "noisy-for"), (0, 1),
                                   (0,), paces=("reader",), interactions=64, eval_replies=8,
                                   extra=("--length-window", "16", "--no-kl-backtrack"),
                                   against="unseen-reader-64-wide"),
    # The line search on the KL tripwire (--kl-backtrack: a candidate over it goes live at
    # half or a quarter of its step, and beta doubles), against the corrections arm above on
    # the same users, seeds and held-out replies before. Why: the users who correct spend KL
    # fast, and whole rounds were rejected at the tripwire, each dropping the first look at
    # its votes: in first-person s0 (on the replay of one round per late round) five of 14,
    # the last three in a row, so its last 16 interactions taught nothing. Two runs
    # (docs/results.md): first-person s0 +0.09 against it (0.24 -> 0.77), noisy-for s0 -0.27
    # (0.24 -> 0.30: two doublings left beta at 0.31-0.39 and the KL fell back to 0.22). Off.
    # Its runs were made at 9822efe, where --kl-backtrack also doubled beta at each trip: that
    # jump is --kl-trip-factor 2 since, and the suite names it.
    "backtrack-varied-reader-64-wide": Suite(("long-word", "opener", "first-person",
                                              "noisy-for"), (0, 1), (8,), paces=("reader",),
                                             interactions=64, eval_replies=8, varied=True,
                                             extra=("--kl-backtrack", "--kl-trip-factor", "2"),
                                             against="unseen-varied-reader-64-wide"),
    # The line search alone (beta follows the whole step's KL by its proportional step, no
    # jump), against the same runs (docs/results.md): first-person s0 +0.11 (0.24 -> 0.80),
    # noisy-for s0 +0.20 (0.24 -> 0.77) and s1 +0.05 (0.23 -> 0.49), first-person s1 +0.02
    # (0.20 -> 0.75); the default since, and this suite names it.
    "line-search-varied-reader-64-wide": Suite(("long-word", "opener", "first-person",
                                                "noisy-for"), (0, 1), (8,), paces=("reader",),
                                               interactions=64, eval_replies=8, varied=True,
                                               extra=("--kl-backtrack",),
                                               against="unseen-varied-reader-64-wide"),
}


def check_user(name: str, shares_files: tuple[Path, ...] = FEATURE_SHARES
               ) -> tuple[str, tuple[str, ...]]:
    """The user's (oracle name, correction sentences), if their feature's base share was
    measured (in one of `shares_files`, the first that has it) and lies in SHARE_RANGE; else
    ValueError saying why."""
    base = name.removeprefix("noisy-")
    if base not in USERS:
        raise BadRequest(f"no suite user {name!r}: one of {', '.join(USERS)} (or noisy-NAME)")
    oracle, sentences = USERS[base]
    features = {}
    for path in reversed(shares_files):
        if path.exists():
            features.update(json.loads(path.read_text())["results"]["features"])
    if oracle not in features:
        raise BadRequest(f"the share of {base!r} among the base model's replies was not "
                         f"measured: python -m bench feature-share --pattern '{oracle}'")
    share = features[oracle]["reply_share"]
    low, high = SHARE_RANGE
    if not low <= share <= high:
        raise BadRequest(f"{base!r} is in {share:.0%} of the base model's replies, outside "
                         f"the claim's range {low:.0%}-{high:.0%}")
    return ("noisy-" if name.startswith("noisy-") else "") + oracle, sentences


def suite_users(suite: Suite, names: str | None) -> set[str]:
    """The users of `suite` whose runs to make: all, or those named (comma-separated); a name
    the suite has not is a ValueError that says which it has."""
    if not names:
        return set(suite.users)
    wanted = {name.strip() for name in names.split(",") if name.strip()}
    if unknown := sorted(wanted - set(suite.users)):
        raise BadRequest(f"not a user of this suite: {', '.join(unknown)} (its users: "
                         f"{', '.join(suite.users)})")
    return wanted


def run_suite(args: argparse.Namespace) -> Path:
    if getattr(args, "read_base", False):
        return read_base(args)
    suite = SUITES[args.suite]
    args = argparse.Namespace(**{**vars(args), "eval_replies": suite.eval_replies})
    users = {name: check_user(name) for name in suite.users}  # refuse before any run
    to_run = suite_users(suite, getattr(args, "suite_users", None))
    args = argparse.Namespace(**{**vars(args), "extra": [*args.extra, *suite.extra]})
    folder = suite_folder(args, args.suite)
    folder.mkdir(parents=True, exist_ok=True)
    before_folder = suite_folder(args, baseline_of(args.suite))
    runs = []
    for every in suite.correct_every:  # an arm at a time: a suite cut short has whole arms
        for seed in suite.seeds:
            for name, (oracle, sentences) in users.items():
                text = list(sentences) if suite.varied else sentences[0]
                for pace in suite.paces:
                    path = folder / f"{name}-s{seed}-{pace}-every{every}.json"
                    if not path.exists() and not args.summarize and name in to_run:
                        run_to_file(args, path, folder, name, oracle, text, seed, pace, every,
                                    suite.interactions, before_folder)
                    if path.exists():
                        runs.append(json.loads(path.read_text()))
    if not runs:
        raise BadRequest(f"no runs of the suite {args.suite!r} in {folder} yet")
    table_text = table(runs, folder)
    lines = headline(runs)
    if suite.against:
        baseline = [json.loads(path.read_text()) for path in
                    sorted(suite_folder(args, suite.against).glob("*-every*.json"))]
        theirs = " ".join(SUITES[suite.against].extra) or "no flags"
        ours = " ".join(suite.extra) or "no flags"
        table_text += (f"\nPaired with the suite {suite.against} (its flags: {theirs}; this "
                       f"suite's: {ours}):\n\n" + paired_table(runs, baseline))
        lines["minus_" + suite.against] = paired_gains(runs, baseline)
    (folder / "table.md").write_text(table_text)
    print(table_text)
    plot(runs, folder / "suite.png")
    return write_result(f"api-user-suite-{args.suite}", {
        "suite": args.suite, "users": list(suite.users), "seeds": list(suite.seeds),
        "correct_every": list(suite.correct_every), "paces": list(suite.paces),
        "interactions": suite.interactions, "varied": suite.varied,
        "eval_prompts": args.eval_prompts, "max_new_tokens": args.max_new_tokens,
        "model": args.model, "extra": args.extra, "against": suite.against},
        lines, Path(args.out or RESULTS))


def sampling_form(extra: list[str] = ()) -> str:
    """What app.py samples the base model's replies with on this machine, given `extra`, as
    part of a file name: its dtype, its quantization where it has one (int4: 4-bit layers on
    a CPU), and the CPU's class (avx2, avx512, avx512-bf16) or cuda: float32-avx2,
    bfloat16-int4-avx512-bf16; another --engine by its name and the CPU's class:
    llama-cpp-avx2."""
    import app
    from chatbot import model

    settings = app.build_parser().parse_args(list(extra))
    device = model.resolve_device(settings.device)
    flags = model.cpu_flags()
    cpu = ("cuda" if device.type == "cuda" else "avx512-bf16"
           if flags & model.NATIVE_BF16_FLAGS else "avx512" if "avx512f" in flags
           else "avx2" if "avx2" in flags else "cpu")
    if settings.engine != "transformers":
        return f"{settings.engine}-{cpu}"
    dtype = model.resolve_dtype(settings.dtype, device)
    quantize = model.resolve_quantization(settings.quantize, device, dtype)
    return "-".join([str(dtype).removeprefix("torch."),
                     *([] if quantize == "none" else [quantize]), cpu])


def read_base(args: argparse.Namespace) -> Path:
    """`--read-base`: the base model's held-out replies of each of the suite's seeds read again
    on this machine with the learner off (kept as base-sSEED-FORM.json in the suite's folder,
    FORM from `sampling_form`; a kept file is read, not sampled again), each user's share and
    the mean words in them beside those of the replies before that the suite's runs were
    scored on (read once per seed, maybe on another machine, dtype or quantization), with a
    two-sided two-proportion p. Where a run's replies after differ from its replies before,
    this says how much of that this machine's engine alone would give. Then each of the
    suite's kept runs of those seeds is judged again against the replies read here: its share
    after beside theirs, one-sided p (pooled, and by prompt), and its words after ÷ theirs.
    Both tables go to base-reread-FORM.md in the suite's folder; the second is the one to read
    for runs made on this machine whose replies before were read on another."""
    suite = SUITES[args.suite]
    users = {name: check_user(name)[0] for name in suite.users}
    extra = [*args.extra, *suite.extra]
    folder = suite_folder(args, args.suite)
    folder.mkdir(parents=True, exist_ok=True)
    kept_folder = suite_folder(args, baseline_of(args.suite))
    form = sampling_form(extra)
    lines = [f"Held-out replies before as the suite's runs were scored on them (`kept`: "
             f"{kept_folder.name}/before-sSEED.json) and read again here ({form}, learner "
             f"off: base-sSEED-{form}.json); share with the feature (replies with it / all), "
             f"mean words, two-sided p of the pooled two-proportion test.", "",
             "| seed | user | kept | read here | p |", "|---|---|---|---|---|"]
    against_here = ["", f"The suite's runs judged against the replies read here ({form}):",
                    "", "| run | read here → after | p (pooled; by prompt) | words after ÷ "
                    "read here |", "|---|---|---|---|"]
    for seed in suite.seeds:
        path = folder / f"base-s{seed}-{form}.json"
        if not path.exists():
            texts = read_held_out(seed=seed, eval_prompts=args.eval_prompts,
                                  eval_replies=suite.eval_replies,
                                  max_new_tokens=args.max_new_tokens, model=args.model,
                                  extra=extra, prompts_file=args.prompts)
            path.write_text(json.dumps({
                "texts": texts, "machine": machine(), "commit": git_commit(),
                "read_by": f"python -m bench api-user --suite {args.suite} --read-base: "
                           f"app.py with the suite's flags and --no-learner, seed {seed}'s "
                           f"{args.eval_prompts} held-out prompts x {suite.eval_replies} "
                           f"replies, as a run reads its replies before"}, indent=1) + "\n")
        here = json.loads(path.read_text())["texts"]
        against_here += judged_again(folder, seed, here, users, suite.eval_replies)
        kept_path = kept_folder / f"before-s{seed}.json"
        if not kept_path.exists():
            lines.append(f"| {seed} | (no kept replies before: {kept_path.name} is not in "
                         f"{kept_folder.name}) | | | |")
            continue
        kept = json.loads(kept_path.read_text())["texts"]
        if len(kept) != len(here):
            raise ValueError(f"{kept_path} holds {len(kept)} replies and {path} {len(here)}: "
                             "read with other --eval-prompts?")
        for name, oracle in users.items():
            truth = make_oracle(oracle, seed)
            a, b = scored(kept, truth), scored(here, truth)
            n = len(here)
            p = min(1.0, 2 * min(one_sided_p(a["satisfied"], b["satisfied"], n),
                                 one_sided_p(b["satisfied"], a["satisfied"], n)))
            lines.append(f"| {seed} | {name} | {a['satisfied']}/{n} ({a['mean_words']:.1f} "
                         f"words) | {b['satisfied']}/{n} ({b['mean_words']:.1f} words) | "
                         f"{p:.2g} |")
    lines += against_here
    out = folder / f"base-reread-{form}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


def judged_again(folder: Path, seed: int, base: list[str], users: dict[str, str],
                 per_prompt: int) -> list[str]:
    """Table rows: each kept run of `seed` in `folder`, its replies after against `base` (the
    base model's held-out replies of that seed, read on this machine)."""
    rows = []
    for path in sorted(folder.glob(f"*-s{seed}-*-every*.json")):
        record = json.loads(path.read_text())
        after = record["results"].get("after_texts")
        name = record["settings"].get("user")
        if not after or name not in users or len(after) != len(base):
            continue
        truth = make_oracle(users[name], seed)
        a, b = scored(base, truth, per_prompt), scored(after, truth, per_prompt)
        n = len(base)
        pooled = one_sided_p(a["satisfied"], b["satisfied"], n)
        strata = stratified_p(a["satisfied_by_prompt"], b["satisfied_by_prompt"], per_prompt)
        rows.append(f"| {path.stem} | {a['satisfied']}/{n} → {b['satisfied']}/{n} | "
                    f"{pooled:.2g}; {strata:.2g} | {b['mean_words'] / a['mean_words']:.2f} |")
    return rows


def baseline_of(name: str) -> str:
    """The suite at the end of `name`'s chain of `against` (or `reads_before_of`): the one
    whose runs read the held-out replies before that every suite of the chain is scored on."""
    seen = {name}
    while SUITES[name].against or SUITES[name].reads_before_of:
        name = SUITES[name].against or SUITES[name].reads_before_of
        assert name not in seen, f"the suites' against form a loop at {name!r}"
        seen.add(name)
    return name


def suite_folder(args: argparse.Namespace, name: str) -> Path:
    return Path(args.out or RESULTS) / f"api-user-suite-{name}"


def run_to_file(args, path: Path, folder: Path, name: str, oracle: str, text: str | list[str],
                seed: int, pace: str, every: int, interactions: int,
                before_folder: Path | None = None) -> None:
    """One run of a suite into `path`. The held-out replies before are sampled once per seed
    (by the first run) and kept in `folder`; a suite paired with another reads that suite's
    (`before_folder`) when it has them."""
    before_path = folder / f"before-s{seed}.json"
    if before_folder and (before_folder / before_path.name).exists():
        before_path = before_folder / before_path.name
    before = json.loads(before_path.read_text()) if before_path.exists() else None
    result = run_one(oracle_name=oracle, seed=seed, interactions=interactions,
                     correct_every=every, correction_text=text, pace=pace,
                     reader_seconds=args.reader_seconds, eval_prompts=args.eval_prompts,
                     eval_replies=args.eval_replies,
                     max_new_tokens=args.max_new_tokens, model=args.model,
                     timeout=args.timeout, extra=args.extra, prompts_file=args.prompts,
                     before_texts=before["texts"] if before else None)
    if before is None:
        before_path.write_text(json.dumps({"texts": result["before_texts"],
                                           "read_by": path.name}, indent=1) + "\n")
    result["before_from"] = (f"{before_path.parent.name}/{before['read_by']}" if before
                             else path.name)
    result.pop("before_texts")
    print(name, seed, pace, every, summary(result))
    write_result(path.stem, run_settings(args, oracle, seed, user=name, pace=pace,
                                         correct_every=every, votes=interactions,
                                         correction_text=text), result, folder)


def headline(runs: list[dict]) -> dict:
    """Per arm and pace: the share of runs significant at 5% and the mean gain with its 95%
    t-interval; and each arm with corrections against votes only, paired by user, seed and
    pace (its gain minus theirs)."""
    from bench.suite import mean_ci

    groups: dict[str, list[dict]] = {}
    by_run: dict[tuple, dict] = {}
    less: dict[str, list[tuple[float, float]]] = {}  # arm -> (gain, p) less the sentence
    for run in runs:
        s, r = run["settings"], run["results"]
        key = f"{s['pace']}-every{s['correct_every']}"
        groups.setdefault(key, []).append(r)
        by_run[_run_key(run)] = r
        scored = less_correction_of(run)
        if scored is not None:
            less.setdefault(key, []).append(
                (scored["satisfied_share_after_less_correction"] - r["satisfied_share_before"],
                 scored["p_value_less_correction"]))
    out = {}
    for key, results in groups.items():
        out[key] = {"runs": len(results),
                    "significant_share": _share_below([r["p_value_one_sided"] for r in results]),
                    "significant_share_by_prompt": _share_below(
                        [p_by_prompt(r) for r in results]),
                    "gain": mean_ci([_gain(r) for r in results]),
                    "length_ratio_min": min(r["length_ratio"] for r in results)}
        if key in less:
            out[key]["less_correction_sentence"] = {
                "significant_share": _share_below([p for _, p in less[key]]),
                "gain": mean_ci([gain for gain, _ in less[key]])}
    for (user, seed, pace, every), result in by_run.items():
        alone = by_run.get((user, seed, pace, 0))
        if every and alone:
            out.setdefault(f"{pace}-every{every}-minus-votes-only", []).append(
                _gain(result) - _gain(alone))
    for key in [k for k in out if k.endswith("minus-votes-only")]:
        out[key] = mean_ci(out[key])
    return out


def _share_below(p_values: list[float | None], level: float = 0.05) -> float | None:
    """The share of p-values under `level`; None if any run lacks one."""
    if any(p is None for p in p_values):
        return None
    return sum(p < level for p in p_values) / len(p_values)


def less_correction_of(run: dict) -> dict | None:
    """A run with corrections, scored with the user's correction sentence taken out of the
    replies after (bench/api_user.py `less_correction`): kept in the run, or computed from
    its replies for a run made before it was; None for a run without corrections, or one
    whose replies after were not kept (runs made before b85e0e0)."""
    from bench.api_user import less_correction
    from bench.oracles import make_oracle

    s, r = run["settings"], run["results"]
    if not s["correct_every"]:
        return None
    if "satisfied_share_after_less_correction" in r:
        return r
    if "after_texts" not in r:
        return None
    n = len(r["after_texts"])
    return less_correction(r["after_texts"], s["correction_text"],
                           make_oracle(s["oracle"], s["seed"]),
                           round(r["satisfied_share_before"] * n))


def gain_by_length(run: dict, folder: Path | None = None) -> tuple[float, float] | None:
    """A run's gain split in two: the share its replies after would have at the replies
    before's rate for their lengths, minus the share before (what the lengths alone explain),
    and the share after minus that (the rest). Kept in the run, or computed from its replies
    after and the replies before kept in `folder`, the run's suite folder (or in the folder
    beside it that `before_from` names); None where either is not kept."""
    s, r = run["settings"], run["results"]
    at_length = r.get("satisfied_share_at_length")
    if at_length is None:
        source = r.get("before_from")
        if folder is None or not source or "after_texts" not in r:
            return None
        kept_in = folder.parent / Path(source).parent.name if "/" in source else folder
        before_path = kept_in / f"before-s{s['seed']}.json"
        if not before_path.exists():
            return None
        at_length = share_at_length(json.loads(before_path.read_text())["texts"],
                                    r["after_texts"], make_oracle(s["oracle"], s["seed"]))
    return (at_length - r["satisfied_share_before"],
            r["satisfied_share_after"] - at_length)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _run_key(run: dict) -> tuple:
    s = run["settings"]
    return (s["user"], s["seed"], s["pace"], s["correct_every"])


def _gain(result: dict) -> float:
    return result["satisfied_share_after"] - result["satisfied_share_before"]


def paired_gains(runs: list[dict], baseline: list[dict]) -> dict:
    """Each run's gain minus its baseline run's (same user, seed, pace and arm): mean and 95%
    t-interval, over the runs both suites have."""
    from bench.suite import mean_ci

    theirs = {_run_key(run): run["results"] for run in baseline}
    differences = [_gain(run["results"]) - _gain(theirs[_run_key(run)])
                   for run in runs if _run_key(run) in theirs]
    return mean_ci(differences) if differences else {"mean": None, "ci": None, "n": 0}


def paired_table(runs: list[dict], baseline: list[dict]) -> str:
    """Each run beside its baseline run: share before -> after and one-sided p, and words
    after / before, for both."""
    theirs = {_run_key(run): run["results"] for run in baseline}
    lines = ["| user | seed | pace | corrections every | baseline: share, p, words ÷ "
             "| this suite: share, p, words ÷ | gain minus baseline's |",
             "|---|---|---|---|---|---|---|"]

    def cell(r: dict) -> str:
        return (f"{r['satisfied_share_before']:.2f} → {r['satisfied_share_after']:.2f}, "
                f"{r['p_value_one_sided']:.3g}, {r['length_ratio']:.2f}")

    for run in runs:
        key, r = _run_key(run), run["results"]
        if key in theirs:
            user, seed, pace, every = key
            lines.append(f"| {user} | {seed} | {pace} | {every or '-'} | {cell(theirs[key])} "
                         f"| {cell(r)} | {_gain(r) - _gain(theirs[key]):+.2f} |")
    return "\n".join(lines) + "\n"


def table(runs: list[dict], folder: Path | None = None) -> str:
    lines = ["| user | seed | pace | corrections every | share before → after | p | p by prompt "
             "| after less the user's correction sentences (p; replies with one) "
             "| words after ÷ before | of the gain: the lengths', the rest "
             "| shorter reply won "
             "| votes the feature decided (won by it; it in the shorter reply) "
             "| corrections | rounds (new items) | vote-to-live median s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        s, r = run["settings"], run["results"]
        live = r["vote_to_live_seconds_median"]
        by_prompt = p_by_prompt(r)
        stratified = "-" if by_prompt is None else f"{by_prompt:.3g}"
        scored = less_correction_of(run)
        less = "-" if scored is None else (
            f"{scored['satisfied_share_after_less_correction']:.2f} "
            f"({scored['p_value_less_correction']:.3g}; "
            f"{scored['replies_with_correction_sentence']})")
        split = gain_by_length(run, folder)
        by_length = "-" if split is None else f"{split[0]:+.2f}, {split[1]:+.2f}"
        lines.append(
            f"| {s['user']} | {s['seed']} | {s['pace']} | {s['correct_every'] or '-'} | "
            f"{r['satisfied_share_before']:.2f} → {r['satisfied_share_after']:.2f} | "
            f"{r['p_value_one_sided']:.3g} | {stratified} | {less} | {r['length_ratio']:.2f} | "
            f"{by_length} | {_share(r.get('shorter_won'))} | "
            f"{_decided(r.get('feature_decided'))} | {r['corrections']} | "
            f"{r['round_sizes']} | {'-' if live is None else f'{live:.0f}'} |")
    return "\n".join(lines) + "\n"


def p_by_prompt(result: dict) -> float | None:
    """The run's one-sided p with each held-out prompt a stratum (bench/api_user.py
    `stratified_p`), computed from its per-prompt counts (so runs kept before the exact test
    are read with it too); None for a run made before the counts were kept."""
    before, after = result.get("before", {}), result.get("after", {})
    if "satisfied_by_prompt" not in before or "satisfied_by_prompt" not in after:
        return None
    return stratified_p(before["satisfied_by_prompt"], after["satisfied_by_prompt"],
                        result.get("eval_replies", 2))


def _decided(counts: dict | None) -> str:
    if counts is None:  # runs made before it was recorded
        return "-"
    return f"{counts['votes']} ({counts['won_by_feature']}; {counts['feature_in_shorter']})"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = sorted({(r["settings"]["user"], r["settings"]["seed"]) for r in runs})
    for offset, every in enumerate(sorted({r["settings"]["correct_every"] for r in runs})):
        gains = {(r["settings"]["user"], r["settings"]["seed"]): _gain(r["results"])
                 for r in runs if r["settings"]["correct_every"] == every}
        ax.bar([i + 0.4 * offset for i in range(len(labels))],
               [gains.get(label, 0.0) for label in labels], width=0.4,
               label=f"a correction every {every}" if every else "votes only")
    ax.set_xticks([i + 0.2 for i in range(len(labels))],
                  [f"{user}\nseed {seed}" for user, seed in labels], fontsize=8)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylabel("held-out share: after - before")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
