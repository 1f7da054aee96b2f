"""Export the stored preference pairs as JSONL in TRL's conversational preference format.

One line per pair with an `A` or `B` vote: `prompt` is the conversation up to and including
the user message of that turn, `chosen` and `rejected` are one assistant message each. Ties
and "both bad" carry no preference between the two replies and are left out.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from chatbot.store import Store


def preference_records(store: Store) -> Iterator[dict]:
    rows = store.preference_rows()
    for row in rows:
        history = [m for m in store.messages(row["conversation_id"])
                   if m["position"] <= row["position"]]
        chosen, rejected = ((row["a_text"], row["b_text"]) if row["choice"] == "A"
                            else (row["b_text"], row["a_text"]))
        yield {"prompt": [{"role": m["role"], "content": m["content"]} for m in history],
               "chosen": [{"role": "assistant", "content": chosen}],
               "rejected": [{"role": "assistant", "content": rejected}]}


def export_preferences(store: Store, out: Path) -> int:
    """Write the JSONL file (atomically: a reader never sees half of it). Returns the count."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in preference_records(store):
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(out)
    return count
