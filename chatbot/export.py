"""Export the stored feedback as JSONL for TRL: preference pairs, or the corrections alone as
supervised examples.

Preference rows (`export_preferences`) are TRL's conversational preference format: `prompt`
is the conversation up to and including the user message of the turn, `chosen` and
`rejected` one assistant message each. A pair with an `A` or `B` vote gives one row; ties and
"both bad" carry no preference between the two replies and are left out. A correction (a
person's rewrite of a reply) gives one row per reply sampled for that turn, the rewrite
chosen over it (two for a pair, one for a reply served alone), except where the rewrite is
that very text.

SFT rows (`export_sft`) are TRL's conversational language-modeling format, one per
correction: `{"messages": [...the prompt, {"role": "assistant", "content": rewrite}]}`.

The prompt is read from the stored conversation: the messages before and at the turn's user
message. A correction rewrites its own turn's reply there, which comes after that turn's
prompt; a later turn's prompt holds the rewrite, as the model saw it when it answered.

Left out: the votes as SFT rows (a chosen reply is only better than the other, not good),
ratings (one reply with no second to compare it to).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from chatbot.store import Store


def _prompt(store: Store, row: dict) -> list[dict]:
    """The conversation up to and including the user message of the row's turn."""
    return [{"role": m["role"], "content": m["content"]}
            for m in store.messages(row["conversation_id"]) if m["position"] <= row["position"]]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def vote_records(store: Store) -> Iterator[dict]:
    """One preference row per pair with an A or B vote."""
    for row in store.preference_rows():
        chosen, rejected = ((row["a_text"], row["b_text"]) if row["choice"] == "A"
                            else (row["b_text"], row["a_text"]))
        yield {"prompt": _prompt(store, row), "chosen": _assistant(chosen),
               "rejected": _assistant(rejected)}


def correction_records(store: Store) -> Iterator[dict]:
    """Per correction, one preference row per sampled reply: the rewrite chosen over it."""
    for row in store.correction_rows():
        prompt = _prompt(store, row)
        for sampled in (row["a_text"], row["b_text"]):
            if sampled is not None and sampled != row["text"]:
                yield {"prompt": prompt, "chosen": _assistant(row["text"]),
                       "rejected": _assistant(sampled)}


def sft_records(store: Store) -> Iterator[dict]:
    """One conversation per correction, ending in the rewrite."""
    for row in store.correction_rows():
        yield {"messages": _prompt(store, row) + _assistant(row["text"])}


def _write(out: Path | str, sources: dict[str, Iterable[dict]]) -> dict[str, int]:
    """Write every source's records to one JSONL file, atomically (a reader never sees half
    of it). Returns how many lines each source gave."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    counts = dict.fromkeys(sources, 0)
    with open(tmp, "w", encoding="utf-8") as handle:
        for name, records in sources.items():
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                counts[name] += 1
    tmp.replace(out)
    return counts


def export_preferences(store: Store, out: Path | str) -> dict[str, int]:
    """Write the preference rows; returns their count from `votes` and from `corrections`."""
    return _write(out, {"votes": vote_records(store),
                        "corrections": correction_records(store)})


def export_sft(store: Store, out: Path | str) -> int:
    """Write the SFT rows (one per correction); returns their count."""
    return _write(out, {"corrections": sft_records(store)})["corrections"]
