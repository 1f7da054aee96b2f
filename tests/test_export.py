"""Export: every voted pair becomes one TRL conversational preference record."""

from __future__ import annotations

import json
import subprocess
import sys

from chatbot.export import export_preferences
from tests.serving import ROOT


def chat(service, user, turns):
    """turns: [(message, choice, (reply_a, reply_b))] in one conversation."""
    conversation = ""
    for message, choice, replies in turns:
        service.generator.replies = replies
        turn = service.ask(user, message, conversation)
        conversation = turn["conversation_id"]
        service.vote(user, turn["pair_id"], choice)
    return conversation


def test_export_round_trips_the_conversation_up_to_each_turn(service, store, tmp_path):
    chat(service, "ann", [("Hi", "A", ("hello!", "go away")),
                          ("How are you?", "B", ("meh", "fine, thanks")),
                          ("Bye", "tie", ("bye", "see you"))])
    chat(service, "bob", [("Name a fruit", "both_bad", ("rock", "car")),
                          ("Name a colour", "B", ("dog", "blue"))])
    out = tmp_path / "prefs.jsonl"
    assert export_preferences(store, out) == 3  # ties and both_bad carry no preference
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[0] == {"prompt": [{"role": "user", "content": "Hi"}],
                          "chosen": [{"role": "assistant", "content": "hello!"}],
                          "rejected": [{"role": "assistant", "content": "go away"}]}
    assert records[1]["prompt"] == [{"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "hello!"},
                                    {"role": "user", "content": "How are you?"}]
    assert records[1]["chosen"][0]["content"] == "fine, thanks"
    assert records[1]["rejected"][0]["content"] == "meh"
    assert records[2]["prompt"] == [{"role": "user", "content": "Name a fruit"},
                                    {"role": "assistant", "content": "rock"},
                                    {"role": "user", "content": "Name a colour"}]
    assert (records[2]["chosen"][0]["content"], records[2]["rejected"][0]["content"]) == \
        ("blue", "dog")


def test_export_command(service, tmp_path):
    chat(service, "ann", [("Hi", "A", ("a", "b"))])
    out = tmp_path / "out.jsonl"
    result = subprocess.run([sys.executable, "app.py", "--data-dir", str(tmp_path), "export",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote 1 preference pairs" in result.stdout
    assert len(out.read_text().splitlines()) == 1
