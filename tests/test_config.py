"""The server hands its learner settings to the learner child on the command line: every one
of them must arrive unchanged."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from chatbot.config import (
    GROUPS,
    Config,
    _candidates,
    _dual_clip,
    _fraction,
    _kl_linear_point,
    _non_negative,
    _non_negative_int,
    _positive_int,
    _trip_factor,
    command_line,
    flag_of,
    learner_argv,
    learner_parser,
    settings,
    with_device_defaults,
)

# Settings the learner child does not get: the server's own, and its torch threads.
SERVER_ONLY = {f.name for f, s in settings() if not s.to_learner()}


def _another_value(f, s, default, tmp_path):
    """A value of the field other than its default, of the type the command line gives."""
    if s.choices:
        return next(c for c in s.choices if c != default)
    if s.kind in ("switch", "on", "off"):
        return not default
    if s.kind == "append":
        return ("ann", "bob")
    if f.name in ("data_dir", "cache_dir"):
        return (tmp_path / f.name).resolve()
    if s.type in (int, _positive_int, _non_negative_int, _candidates):
        return (default or 0) + 3
    if s.type is _fraction:  # within [0, 1]
        return default - 0.25 if default >= 0.5 else default + 0.25
    if s.type in (float, _non_negative, _trip_factor):  # _trip_factor: within [1, 100]
        return (default or 0) + 0.25
    if s.type is _dual_clip:  # 0 (off) or more than 1
        return 3.0 if default == 0 else 0.0
    if s.type is _kl_linear_point:  # within [0, 20]
        return 3.0 if default == 0 else 0.0
    return "postgresql://duet@db.example/duet" if f.name == "db" else f"some-{f.name}"


def test_every_setting_has_help_parses_and_reaches_the_learner_when_it_should(tmp_path):
    """Each Config field is declared once, with its setting: it has help, the server's command
    line sets it, and the learner child gets it if and only if it should."""
    import app

    assert {f.name for f in dataclasses.fields(Config)} == {f.name for f, _ in settings()}
    default, argv, expected = Config(), [], {}
    for f, s in settings():
        assert s.group in GROUPS and len(s.help) > 20, f.name
        expected[f.name] = _another_value(f, s, getattr(default, f.name), tmp_path)
        argv += command_line(f, s, expected[f.name])
    server = Config.from_args(app.build_parser().parse_args(argv))
    for name, value in expected.items():
        assert getattr(server, name) == value, name
    handed = Config.from_args(learner_parser().parse_args(learner_argv(server)))
    for f, s in settings():
        wanted = getattr(server if s.to_learner() else default, f.name)
        assert getattr(handed, f.name) == wanted, f.name
    assert "threads" in SERVER_ONLY and "learner_threads" in SERVER_ONLY
    assert "lr" not in SERVER_ONLY and "data_dir" not in SERVER_ONLY
    assert isinstance(handed.data_dir, Path)


def test_help_shows_every_flag_with_its_default():
    import app

    text = app.build_parser().format_help()
    for f, s in settings():
        assert flag_of(f, s) in text, f.name
    assert "(default: 0.001)" in text and "{default" not in text


def test_defaults_and_false_switches_arrive_too(tmp_path):
    config = Config(data_dir=tmp_path / "data", judge_new=False)
    argv = learner_argv(config)
    assert "--no-judge-new" in argv and "--threads" not in argv and "--preview" in argv
    handed = Config.from_args(learner_parser().parse_args(argv))
    for field in dataclasses.fields(Config):
        if field.name not in SERVER_ONLY:
            assert getattr(handed, field.name) == getattr(config, field.name), field.name


def test_the_reply_length_follows_the_device_unless_given(monkeypatch):
    import torch

    import app
    from chatbot.config import CPU_MAX_NEW_TOKENS, GPU_MAX_NEW_TOKENS

    def settings(*argv: str) -> Config:
        return Config.from_args(with_device_defaults(app.build_parser().parse_args(argv)))

    assert settings("--device", "cpu").max_new_tokens == CPU_MAX_NEW_TOKENS
    assert settings("--device", "cpu", "--max-new-tokens", "20").max_new_tokens == 20
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert settings().max_new_tokens == GPU_MAX_NEW_TOKENS  # auto: cuda
    assert settings("--device", "cpu").max_new_tokens == CPU_MAX_NEW_TOKENS
    assert settings("--max-new-tokens", "20").max_new_tokens == 20
    assert GPU_MAX_NEW_TOKENS > CPU_MAX_NEW_TOKENS


def test_the_learner_child_shares_the_cpu_with_the_server(tmp_path):
    """--threads while the server works, --idle-threads (if set) while it is idle, and the
    server's pid to watch; the learner's own parser takes them all."""
    import os

    from chatbot.learner_process import LearnerProcess

    config = Config(data_dir=tmp_path / "data", learner_threads=1, learner_idle_threads=3)
    argv = LearnerProcess(config, store=None).argv()[3:]  # after python -m learner
    args = learner_parser().parse_args(argv)
    assert (args.threads, args.idle_threads, args.share_cpu_with) == (1, 3, os.getpid())
    default = LearnerProcess(Config(data_dir=tmp_path / "data"), store=None).argv()
    assert "--idle-threads" not in default and "--share-cpu-with" in default


def test_bounded_settings_refuse_values_out_of_range_and_say_so(capsys):
    import app

    for flag, value, message in [("--pair-candidates", "1", "between 2 and 8, got 1"),
                                 ("--pair-candidates", "9", "between 2 and 8, got 9"),
                                 ("--length-neutral", "1.5", "between 0 and 1, got 1.5"),
                                 ("--length-window", "-4", "must be 0 or more, got -4"),
                                 ("--explore-temperature", "-0.5", "0 or more, got -0.5"),
                                 ("--explore-temperature", "nan", "0 or more, got nan"),
                                 ("--dual-clip", "0.8", "0 (off) or more than 1, got 0.8"),
                                 ("--kl-linear-beyond", "-1", "between 0 (off) and 20 nats"),
                                 ("--kl-linear-beyond", "90", "and 20 nats, got 90"),
                                 ("--kl-trip-factor", "0.5", "1 (no jump) and 100, got 0.5"),
                                 ("--kl-trip-factor", "nan", "1 (no jump) and 100, got nan")]:
        with pytest.raises(SystemExit):
            app.build_parser().parse_args([flag, value])
        assert message in capsys.readouterr().err
    assert Config.from_args(app.build_parser().parse_args(["--pair-candidates", "4"])
                            ).pair_candidates == 4


def test_an_exploring_pair_goes_with_neither_candidates_nor_vllm():
    """--explore-temperature draws one reply of a plain pair at another temperature: the
    server refuses it beside --pair-candidates above 2, and on vLLM (whose request draws all
    its replies at one temperature), and says why."""
    import app
    from chatbot.errors import InvalidInput

    app.check_pairs(Config(explore_temperature=1.2))
    app.check_pairs(Config(pair_candidates=4))
    with pytest.raises(InvalidInput, match="choose one way to make a pair"):
        app.check_pairs(Config(explore_temperature=1.2, pair_candidates=4))
    with pytest.raises(InvalidInput, match="needs --engine transformers"):
        app.check_pairs(Config(explore_temperature=1.2, engine="vllm",
                               engine_url="http://127.0.0.1:8000"))
