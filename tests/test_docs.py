"""The commands the README and docs/ show still exist: every `python app.py`, `python -m
learner` and `python -m bench` line's flags are flags of that command (and of the subcommands
it names). A renamed or removed flag fails here, not in a reader's terminal."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"python (app\.py|-m learner|-m bench)((?:[ \t]+[^`#|\s]+)*)")


def shown_commands() -> list[tuple[str, str, str]]:
    """(page, program, the rest of the line) for each command the pages show."""
    found = []
    for page in PAGES:
        for match in COMMAND.finditer(page.read_text()):
            found.append((page.name, match.group(1), match.group(2).strip()))
    return found


def known_options(parser: argparse.ArgumentParser, words: list[str]) -> set[str]:
    """The option strings valid on this command line: the parser's, and those of each
    subcommand the words name, level by level."""
    options = set(parser._option_string_actions)
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    for i, word in enumerate(words):
        if sub is not None and word in sub.choices:
            return options | known_options(sub.choices[word], words[i + 1:])
    return options


def parser_of(program: str) -> argparse.ArgumentParser:
    if program == "app.py":
        import app

        return app.build_parser()
    if program == "-m learner":
        from chatbot.config import learner_parser

        return learner_parser()
    from bench.__main__ import build_parser

    return build_parser()[0]


def test_the_pages_show_commands():
    programs = {program for _, program, _ in shown_commands()}
    assert programs == {"app.py", "-m learner", "-m bench"}
    assert len(shown_commands()) > 40


@pytest.mark.parametrize("page,program,rest", shown_commands())
def test_every_flag_a_page_shows_exists(page, program, rest):
    words = shlex.split(rest.replace("...", ""))
    # A bench's `--extra` passes the rest of the line to app.py: those are app.py's flags.
    app_words = []
    if program == "-m bench" and "--extra" in words:
        cut = words.index("--extra")
        words, app_words = words[:cut], words[cut + 1:]
    for parser, checked in ((parser_of(program), words), (parser_of("app.py"), app_words)):
        flags = [w.split("=")[0] for w in checked if w.startswith("--")]
        unknown = set(flags) - known_options(parser, checked)
        assert not unknown, f"{page}: python {program} {rest}: no such flag {sorted(unknown)}"
