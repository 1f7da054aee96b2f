"""Simulated users with a hidden preference, for the learning benchmark and test.

Each oracle says whether one reply satisfies its preference, and which of two replies it
prefers (A, B, or tie when the preference does not separate them). They read only the reply
text, like a person would.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


def words(text: str) -> int:
    return len(text.split())


@dataclass(frozen=True)
class Oracle:
    name: str
    description: str

    def satisfied(self, reply: str) -> bool:
        raise NotImplementedError

    def prefer(self, a: str, b: str) -> str:
        sa, sb = self.satisfied(a), self.satisfied(b)
        if sa == sb:
            return "tie"
        return "A" if sa else "B"


class Shorter(Oracle):
    """Prefers the reply with fewer words; 'satisfied' means at most `limit` words."""

    limit = 20

    def satisfied(self, reply: str) -> bool:
        return 0 < words(reply) <= self.limit

    def prefer(self, a: str, b: str) -> str:
        # An empty reply is never what a person wants, however short.
        wa = words(a) if a.strip() else 10**6
        wb = words(b) if b.strip() else 10**6
        if wa == wb:
            return "tie"
        return "A" if wa < wb else "B"


class ContainsWord(Oracle):
    word = "sure"

    def satisfied(self, reply: str) -> bool:
        return re.search(rf"\b{self.word}\b", reply, re.IGNORECASE) is not None


class NumberedList(Oracle):
    def satisfied(self, reply: str) -> bool:
        return re.search(r"^\s*1[.)]\s", reply, re.MULTILINE) is not None


class EndsWithQuestion(Oracle):
    def satisfied(self, reply: str) -> bool:
        return reply.rstrip().endswith("?")


class Polite(Oracle):
    markers = ("please", "thank", "happy to help", "glad", "of course", "certainly")

    def satisfied(self, reply: str) -> bool:
        text = reply.lower()
        return any(marker in text for marker in self.markers)


ORACLES: dict[str, Oracle] = {o.name: o for o in [
    Shorter("shorter", "prefers the shorter reply (fewer words)"),
    ContainsWord("word", "prefers a reply that contains the word 'sure'"),
    NumberedList("list", "prefers a reply with a numbered list"),
    EndsWithQuestion("question", "prefers a reply that ends with a question"),
    Polite("polite", "prefers a reply with polite phrasing (please, thank you, glad to...)"),
]}
