"""The server hands its learner settings to the learner child on the command line: every one
of them must arrive unchanged."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from chatbot.config import Config, learner_argv, learner_parser, with_device_defaults

# Settings only the server uses; everything else in Config must reach the learner.
SERVER_ONLY = {"host", "port",
               "max_message_chars", "max_turns", "concurrency", "queue_size",
               "swap_poll_seconds", "start_learner", "learner_nice", "learner_threads",
               "learner_idle_threads",
               "max_votes_per_minute", "admins", "share", "learner_poll_seconds", "threads",
               "engine", "engine_url",
               "pair_kernels"}  # the learner never installs them (chatbot/model.py)


def test_every_learner_setting_reaches_the_learner_child(tmp_path):
    changed = Config(
        model="some/model", quantize="4bit", dtype="bfloat16", device="cpu",
        cache_dir=tmp_path / "cache",
        max_new_tokens=17, temperature=0.6, top_p=0.9, max_prompt_tokens=300, seed=5,
        data_dir=tmp_path / "data", db="postgresql://duet@db.example/duet", objective="dpo",
        learn_every=3, learn_after_seconds=5.0,
        lr=2e-4, lora_r=4, lora_alpha=8, beta=0.07, kl_budget=0.3, dpo_beta=0.2, clip_eps=0.1,
        steps_per_round=5, preview=False, replay=7, self_samples=2, negative_weight=0.25,
        judge_new=True, kl_tripwire=0.9, gate_z=2.0, keep_versions=4, max_batch_votes=9,
        max_user_share=0.4)
    handed = Config.from_args(learner_parser().parse_args(learner_argv(changed)))
    default = Config()
    for field in dataclasses.fields(Config):
        if field.name in SERVER_ONLY:
            continue
        assert getattr(changed, field.name) != getattr(default, field.name), (
            f"the test should change {field.name} from its default")
        assert getattr(handed, field.name) == getattr(changed, field.name), field.name
    assert isinstance(handed.data_dir, Path)


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
