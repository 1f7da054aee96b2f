"""Choosing the pair to show from several candidates: the two whose words differ most, among
the pairs of about the same length."""

from __future__ import annotations

import pytest

from chatbot.pair_choice import distance, most_different, similar_length, word_set


def test_word_sets_ignore_case_and_punctuation_and_keep_contractions():
    assert word_set("It's a dog. A DOG!") == {"it's", "a", "dog"}
    assert word_set("It’s") == {"it’s"}
    assert word_set("!!! ...") == frozenset()


def test_distance_is_jaccard():
    assert distance(word_set("a b"), word_set("a b")) == 0.0
    assert distance(word_set("a b"), word_set("c d")) == 1.0
    assert distance(word_set("a b c"), word_set("a b d")) == pytest.approx(0.5)
    assert distance(frozenset(), frozenset()) == 0.0


def test_the_most_different_pair_is_chosen_and_ties_go_to_the_first():
    texts = ["the cat sat", "the cat sat on", "you can do it", "the cat ran"]
    # 0-2 and 1-2 share no word; 1 and 2 are 4 words each, 0 is 3 (within a quarter of 4)
    assert most_different(texts) == (0, 2)
    assert most_different(["a b", "a b c"]) == (0, 1)  # two candidates: the pair itself


def test_pairs_of_similar_length_come_first():
    assert similar_length(4, 3) and not similar_length(4, 2) and similar_length(0, 0)
    long = "the cat sat on the mat and looked at the dog"
    texts = [long, "yes", long.replace("dog", "bird").replace("cat", "fox")]
    # "yes" shares nothing with the others, but it is a quarter of their length
    assert most_different(texts) == (0, 2)
    assert most_different(["one two three four five six", "seven"]) == (0, 1)  # no other pair


def test_a_reply_without_words_is_never_chosen_while_two_others_remain():
    assert most_different(["a b", "", "a c", "  ", "!!!"]) == (0, 2)
    assert most_different(["", "a"]) == (0, 1)  # nothing else to show
    with pytest.raises(AssertionError):
        most_different(["only one"])
