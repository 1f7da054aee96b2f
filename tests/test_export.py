"""Export: voted pairs and corrections as TRL conversational preference records, and
corrections alone as TRL conversational SFT records."""

from __future__ import annotations

import json
import subprocess
import sys

from chatbot.export import export_preferences, export_sft
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
    # ties and both_bad carry no preference
    assert export_preferences(store, out) == {"votes": 3, "corrections": 0}
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
    assert "(1 from votes, 0 from corrections)" in result.stdout
    assert len(out.read_text().splitlines()) == 1


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def corrected_chats(service, store):
    """ann: a voted turn, a turn she rewrote (twice: the second counts), a voted turn after
    it; bob: a reply served alone (n=1) through the API's verb, rewritten."""
    conversation = chat(service, "ann", [("Hi", "A", ("hello!", "go away"))])
    service.generator.replies = ("meh", "fine")
    turn = service.ask("ann", "How are you?", conversation)
    service.correct("ann", turn["pair_id"], "first try", side="B")
    service.correct("ann", turn["pair_id"], "Very well, thank you.", side="B")
    service.generator.replies = ("a sentence", "unused")
    single = next(r for r in service.complete_stream(
        "bob", [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Say hi"}], n=1) if r["done"])
    service.correct("bob", single["pair_id"], "Hi!")
    # ann's conversation goes on from her rewrite: the next prompt holds it
    service.generator.replies = ("bye", "ciao")
    turn = service.ask("ann", "Bye", conversation)
    service.vote("ann", turn["pair_id"], "B")
    return conversation


def test_a_correction_is_chosen_over_each_sampled_reply(service, store, tmp_path):
    corrected_chats(service, store)
    out = tmp_path / "prefs.jsonl"
    assert export_preferences(store, out) == {"votes": 2, "corrections": 3}
    records = read(out)
    asked = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hello!"},
             {"role": "user", "content": "How are you?"}]
    rewrite = [{"role": "assistant", "content": "Very well, thank you."}]
    assert records[2:] == [
        {"prompt": asked, "chosen": rewrite,
         "rejected": [{"role": "assistant", "content": "meh"}]},
        {"prompt": asked, "chosen": rewrite,
         "rejected": [{"role": "assistant", "content": "fine"}]},
        {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Say hi"}],
         "chosen": [{"role": "assistant", "content": "Hi!"}],
         "rejected": [{"role": "assistant", "content": "a sentence"}]}]
    # the later turn was asked after the rewrite, and its prompt says so
    assert records[1]["prompt"] == asked + rewrite + [{"role": "user", "content": "Bye"}]
    assert records[1]["chosen"][0]["content"] == "ciao"


def test_a_rewrite_that_equals_a_sampled_reply_is_not_chosen_over_itself(service, store,
                                                                        tmp_path):
    service.generator.replies = ("same", "other")
    turn = service.ask("ann", "Hi")
    service.correct("ann", turn["pair_id"], "same", side="A")
    out = tmp_path / "prefs.jsonl"
    assert export_preferences(store, out) == {"votes": 0, "corrections": 1}
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in read(out)] == [
        ("same", "other")]


def test_sft_export_is_one_conversation_per_correction(service, store, tmp_path):
    corrected_chats(service, store)
    out = tmp_path / "sft.jsonl"
    assert export_sft(store, out) == 2
    assert read(out) == [
        {"messages": [{"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "hello!"},
                      {"role": "user", "content": "How are you?"},
                      {"role": "assistant", "content": "Very well, thank you."}]},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Say hi"},
                      {"role": "assistant", "content": "Hi!"}]}]


def test_export_command_with_sft(service, store, tmp_path):
    corrected_chats(service, store)
    prefs, sft = tmp_path / "prefs.jsonl", tmp_path / "sft.jsonl"
    for out, flags, said in [
            (prefs, [], f"wrote 5 preference pairs to {prefs} (2 from votes, 3 from "
                        "corrections)"),
            (sft, ["--sft"], f"wrote 2 SFT rows (one per correction) to {sft}")]:
        result = subprocess.run([sys.executable, "app.py", "--data-dir", str(tmp_path),
                                 "export", "--out", str(out), *flags], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert said in result.stdout
    assert len(read(prefs)) == 5 and all(set(r) == {"prompt", "chosen", "rejected"}
                                         for r in read(prefs))
    assert [r["messages"][-1]["content"] for r in read(sft)] == ["Very well, thank you.", "Hi!"]
