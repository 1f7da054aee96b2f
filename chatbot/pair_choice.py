"""Which two of several sampled replies to show as the pair (`--pair-candidates K`).

A vote teaches what a person wants only when the two replies differ in it. Two samples of one
policy often do not: on the embedded model, a feature in a fifth to a half of the replies
separates only a fifth to a third of the pairs, and the other votes go to whatever the person
breaks ties by (bench/results/feature-share.json), most often the shorter reply. With K > 2
candidates sampled in one batch, the server shows the two whose word sets differ most (Jaccard
distance) among the pairs of about the same length (word counts within a quarter of each
other; any pair if none is): the aim is that more votes fall on replies that differ in
content, whatever a person looks for, and fewer on a difference in length. Jaccard distance
alone would favour a short reply beside a long one. `python -m bench feature-share
--candidates K` measures how often such a pair differs in a feature, against a plain pair.

Each shown reply keeps its exact per-token log-probs under the adapter that sampled it, and the
learner takes no importance weights to the sampler (learner/objectives.py), so nothing changes
on its side. The shown pair is no longer two independent draws of the policy, though: the
leave-one-out advantages still point from the rejected reply to the chosen one, but their
gradient is no longer an unbiased estimate of the policy's; the pair records how many
candidates it was chosen from (`pairs.candidates`).

Left out: choosing by a reward model fitted on the votes (`python -m bench pair-choice`
measured the learner's on the base model's candidates: its pairs differed in a user's feature
no more often than plain ones, docs/results.md);
choosing before the replies are complete (the candidates are drafted whole, so the pair is
shown when all K are done, not streamed).
"""

from __future__ import annotations

import itertools
import re

_WORD = re.compile(r"\w+(?:['’]\w+)?")
LENGTH_TOLERANCE = 0.25  # word counts of a pair within a quarter of the longer one's


def words(text: str) -> list[str]:
    """The words of a reply, lower-cased, with contractions kept whole."""
    return _WORD.findall(text.lower())


def word_set(text: str) -> frozenset[str]:
    """The distinct words of a reply."""
    return frozenset(words(text))


def distance(a: frozenset[str], b: frozenset[str]) -> float:
    """Jaccard distance of two word sets: 0 for the same words, 1 for none in common."""
    union = a | b
    return 1.0 - len(a & b) / len(union) if union else 0.0


def similar_length(a: int, b: int, tolerance: float = LENGTH_TOLERANCE) -> bool:
    return abs(a - b) <= tolerance * max(a, b)


def most_different(texts: list[str]) -> tuple[int, int]:
    """The indices (i < j) of the two texts whose word sets differ most, among the pairs of
    similar length if there is one; the first such pair in index order on a tie. A reply
    without words is never chosen while two others remain (it differs from everything, and is
    never what a person wants)."""
    assert len(texts) >= 2, "a pair needs two candidates"
    tokens = [words(text) for text in texts]
    counts = [len(t) for t in tokens]
    sets = [frozenset(t) for t in tokens]
    usable = [i for i, count in enumerate(counts) if count]
    if len(usable) < 2:
        usable = list(range(len(texts)))
    pairs = list(itertools.combinations(usable, 2))
    matched = [(i, j) for i, j in pairs if similar_length(counts[i], counts[j])]
    best, best_distance = None, -1.0
    for i, j in matched or pairs:
        d = distance(sets[i], sets[j])
        if d > best_distance:
            best, best_distance = (i, j), d
    assert best is not None
    return best
