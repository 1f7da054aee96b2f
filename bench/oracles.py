"""Simulated users with a hidden preference, for the learning benchmark and test.

Each oracle says whether one reply satisfies its preference, and which of two replies it
prefers: A, B, or tie. They read only the reply text, like a person would.

Most look like people rather than clean rules: a person who wants a feature (a digit, a list,
a question back, a word) picks the reply that has it, and when both or neither have it they
still pick one - the shorter, since people rarely say "tie" (`tie_break="shorter"`). A noisy
annotator flips a share of their votes at random (human annotators agree with each other
only ~70-75% of the time). Evaluation always judges by the clean preference (`truth`).

A user who fixes a reply (`corrected`) keeps it as it is and puts first a sentence of their own
that has the feature they want: the edit a person makes when a reply lacks one thing.

Left out: preferences that depend on the prompt, several users who disagree, edits that
rewrite a reply throughout.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass


def words(text: str) -> int:
    return len(text.split())


def shorter(a: str, b: str) -> str:
    """A or B, whichever has fewer words; an empty reply is never what a person wants."""
    wa = words(a) if a.strip() else 10**6
    wb = words(b) if b.strip() else 10**6
    if wa == wb:
        return "tie"
    return "A" if wa < wb else "B"


@dataclass(frozen=True)
class Oracle:
    name: str
    description: str
    tie_break: str = "none"  # "shorter": when the feature does not separate them

    def satisfied(self, reply: str) -> bool:
        raise NotImplementedError

    def prefer(self, a: str, b: str) -> str:
        sa, sb = self.satisfied(a), self.satisfied(b)
        if sa != sb:
            return "A" if sa else "B"
        return shorter(a, b) if self.tie_break == "shorter" else "tie"

    @property
    def truth(self) -> Oracle:
        """The preference without annotation noise: what evaluations judge by."""
        return self


class Shorter(Oracle):
    """Prefers the reply with fewer words; 'satisfied' means at most `limit` words."""

    limit = 20

    def satisfied(self, reply: str) -> bool:
        return 0 < words(reply) <= self.limit

    def prefer(self, a: str, b: str) -> str:
        return shorter(a, b)


@dataclass(frozen=True)
class Pattern(Oracle):
    """Satisfied when the reply matches a regular expression (case-insensitive, multiline)."""

    pattern: str = ""

    def satisfied(self, reply: str) -> bool:
        return re.search(self.pattern, reply, re.IGNORECASE | re.MULTILINE) is not None


class Noisy(Oracle):
    """Another oracle's votes with a share `flip` of the A/B votes turned around at random."""

    def __init__(self, inner: Oracle, flip: float = 0.2, seed: int = 0) -> None:
        super().__init__(f"noisy-{inner.name}",
                         f"{inner.description}, {flip:.0%} of votes flipped at random")
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "flip", flip)
        object.__setattr__(self, "rng", random.Random(seed))

    def satisfied(self, reply: str) -> bool:
        return self.inner.satisfied(reply)

    def prefer(self, a: str, b: str) -> str:
        verdict = self.inner.prefer(a, b)
        if verdict != "tie" and self.rng.random() < self.flip:
            return "B" if verdict == "A" else "A"
        return verdict

    @property
    def truth(self) -> Oracle:
        return self.inner


def _pattern(name: str, description: str, pattern: str, tie_break: str = "shorter") -> Pattern:
    return Pattern(name, description + (", else the shorter" if tie_break == "shorter" else ""),
                   tie_break, pattern)


ORACLES: dict[str, Oracle] = {o.name: o for o in [
    Shorter("shorter", "prefers the shorter reply (fewer words)"),
    _pattern("word", "prefers a reply that contains the word 'sure'", r"\bsure\b", "none"),
    _pattern("list", "prefers a reply with a numbered list", r"^\s*1[.)]\s", "none"),
    _pattern("question", "prefers a reply that ends with a question", r"\?\s*\Z", "none"),
    _pattern("polite", "prefers polite phrasing (please, thank you, glad to...)",
             r"please|thank|happy to help|glad|of course|certainly", "none"),
    # People, not rules: a feature in a fifth to a half of the base model's replies (shares
    # measured on 634 base replies of 48 tokens to bench/data/prompts.txt), and the shorter
    # reply when the feature does not decide.
    _pattern("numbers", "prefers a reply with a number in it (34% of base replies)",
             r"\d|\b(one|two|three|four|five|six|seven|eight|nine|ten|first|second|third)\b"),
    _pattern("you", "prefers a reply that speaks to the user as 'you' (24%)",
             r"\byou(r|rs|'re|'ll)?\b"),
    _pattern("finished", "prefers a reply that ends its last sentence (26%)",
             r"[.!?][\"')]*\s*\Z"),
    _pattern("can", "prefers a reply with the word 'can' (23%)", r"\bcan\b"),
]}


def corrected(oracle: Oracle, reply: str, addition: str) -> str | None:
    """The reply as a user with `oracle`'s preference rewrites it: `addition` (a sentence with
    the feature) first, the rest kept; None when the reply has the feature already (nothing
    to fix). ValueError if `addition` itself does not have the feature."""
    if not oracle.truth.satisfied(addition):
        raise ValueError(f"the correction text {addition!r} does not have the feature "
                         f"{oracle.truth.name!r} wants")
    if oracle.truth.satisfied(reply):
        return None
    return f"{addition} {reply.strip()}".strip()


def make_oracle(name: str, seed: int = 0) -> Oracle:
    """An oracle by name; `noisy-NAME` is NAME with 20% of its votes flipped; `re:PATTERN` is a
    user nobody tuned for: prefers a reply matching the regular expression, else the shorter."""
    if name.startswith("noisy-"):
        return Noisy(make_oracle(name.removeprefix("noisy-")), 0.2, seed)
    if name.startswith("re:"):
        pattern = name.removeprefix("re:")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {pattern!r} ({exc})") from None
        return _pattern(name, f"prefers a reply matching {pattern!r}", pattern)
    if name not in ORACLES:
        raise ValueError(f"no oracle {name!r}: one of {', '.join(sorted(ORACLES))}, "
                         "noisy-NAME or re:PATTERN")
    return ORACLES[name]
