"""Every benchmark runs end to end on a tiny setting and writes a sane JSON result. (The
numbers themselves are measured by running the benchmarks, not by tests.)"""

from __future__ import annotations

import json
import os

import pytest
import torch

from bench.__main__ import main as bench
from bench.oracles import ORACLES, make_oracle
from bench.simulate import load_prompts, sign_test_p, split_prompts


def result(folder, name) -> dict:
    record = json.loads((folder / f"{name}.json").read_text())
    assert record["benchmark"] == name
    assert record["machine"]["torch"] and record["settings"]
    return record["results"]


def test_prompts_are_many_varied_and_split():
    prompts = load_prompts()
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts)
    train, held_out = split_prompts(prompts, 32)
    assert len(held_out) == 32 and not set(train) & set(held_out)


@pytest.mark.parametrize("name", sorted(ORACLES))
def test_oracles_prefer_what_they_say(name):
    oracle = ORACLES[name]
    good = {"shorter": "Yes.", "word": "Sure, here it is.", "list": "Steps:\n1. one\n2. two",
            "question": "Shall we start?", "polite": "Thank you for asking.",
            "numbers": "It takes 3 long days of careful work", "you": "Here is what you need",
            "finished": "It takes long days of careful work.", "can": "We can do it"}[name]
    bad = {"shorter": "Yes, " + "and more words " * 8}.get(name, "No")
    assert oracle.satisfied(good) and not oracle.satisfied(bad)
    assert oracle.prefer(good, bad) == "A" and oracle.prefer(bad, good) == "B"


def test_people_like_oracles_break_ties_toward_the_shorter_reply():
    oracle = ORACLES["numbers"]
    assert oracle.prefer("a b c d", "a b") == "B"  # neither has a number: the shorter
    assert oracle.prefer("a 1 b c d", "a 2") == "B"  # both have one: the shorter
    assert oracle.prefer("a", "") == "A"  # an empty reply never wins
    assert ORACLES["list"].prefer("a b c d", "a b") == "tie"  # a clean rule: no tie-break


def test_a_user_nobody_tuned_for_is_a_regular_expression_else_the_shorter():
    oracle = make_oracle(r"re:\bfor (example|instance)\b")
    assert oracle.satisfied("Bread, for example, rises.") and not oracle.satisfied("Bread.")
    assert oracle.prefer("Bread.", "Bread, for instance, rises.") == "B"
    assert oracle.prefer("a b c", "a b") == "B"  # neither matches: the shorter
    assert make_oracle("noisy-re:x").truth.satisfied("x")
    with pytest.raises(ValueError, match="not a regular expression"):
        make_oracle("re:(")
    with pytest.raises(ValueError, match="no oracle 'nope'"):
        make_oracle("nope")


def test_noisy_annotator_flips_about_a_fifth_and_is_judged_clean():
    noisy = make_oracle("noisy-numbers", seed=3)
    verdicts = [noisy.prefer("one thing", "nothing at all here") for _ in range(2000)]
    assert 0.15 < verdicts.count("B") / len(verdicts) < 0.25
    assert noisy.truth is ORACLES["numbers"]
    assert noisy.truth.prefer("one thing", "nothing at all here") == "A"


def test_sign_test():
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(10, 0) == pytest.approx(1 / 1024)
    assert sign_test_p(5, 5) > 0.5


def test_learn_runs(tiny_model_dir, tmp_path):
    bench(["learn", "--model", str(tiny_model_dir), "--device", "cpu", "--votes", "4",
           "--checkpoints", "0,4", "--eval-prompts", "2", "--max-new-tokens", "6",
           "--learn-every", "2", "--out", str(tmp_path)])
    results = result(tmp_path, "learn-shorter-pg")
    assert [e["votes"] for e in results["evaluations"]] == [0, 4]
    assert results["evaluations"][0]["win_rate"] == 0.5  # the base against itself
    assert len(results["rounds"]) == 2
    assert (tmp_path / "learn-shorter-pg.png").stat().st_size > 0


def test_learn_runs_with_corrections(tiny_model_dir, tmp_path):
    bench(["learn", "--oracle", "can", "--model", str(tiny_model_dir), "--device", "cpu",
           "--votes", "4", "--checkpoints", "0,4", "--eval-prompts", "2", "--max-new-tokens",
           "6", "--learn-every", "2", "--correct-every", "2", "--correction-text",
           "I can help.", "--out", str(tmp_path)])
    results = result(tmp_path, "learn-can-pg-correct2")
    assert results["corrections"] == 2  # the tiny model never says "can": each due one made
    # each round: two votes and the correction sent with the second
    assert [r["new_votes"] for r in results["rounds"]] == [3, 3]


@pytest.mark.slow
def test_learn_vs_trl_runs(tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    bench(["learn", "--model", str(tiny_model_dir), "--device", "cpu", "--votes", "4",
           "--checkpoints", "0,4", "--eval-prompts", "2", "--max-new-tokens", "6",
           "--learn-every", "2", "--vs", "trl", "--out", str(tmp_path)])
    results = result(tmp_path, "learn-shorter-pg-vs-trl")
    assert [e["votes"] for e in results["trl_evaluations"]] == [0, 4]


@pytest.mark.slow
def test_learn_suite_runs_and_caches_the_trl_side(tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    argv = ["learn", "--suite", "quick", "--votes-cap", "4", "--model", str(tiny_model_dir),
            "--device", "cpu", "--eval-prompts", "2", "--max-new-tokens", "6",
            "--learn-every", "2", "--out", str(tmp_path)]
    bench(argv)
    first = result(tmp_path, "learn-suite-quick")
    assert [(r["oracle"], r["trl_cached"]) for r in first["runs"]] == [("numbers", False),
                                                                        ("you", False)]
    assert all([e["votes"] for e in r["duet"]] == [0, 4] for r in first["runs"])
    assert len(list((tmp_path / "trl-cache").glob("*.json"))) == 2
    bench(argv)  # a second run of the suite reuses the kept runs: nothing runs again
    second = result(tmp_path, "learn-suite-quick")
    assert second["runs_reused"] == 2
    assert [r["duet"] for r in second["runs"]] == [r["duet"] for r in first["runs"]]
    assert [r["trl_cached"] for r in second["runs"]] == [True, True]
    kept = sorted((tmp_path / "learn-suite-quick" / "runs").glob("*.json"))
    assert len(kept) == 2
    for path in kept:  # without its kept runs, Duet's side runs again, TRL's comes from cache
        path.unlink()
    bench(argv)
    third = result(tmp_path, "learn-suite-quick")
    assert third["runs_reused"] == 0
    assert [r["trl_cached"] for r in third["runs"]] == [True, True]
    assert third["runs"][0]["trl"] == first["runs"][0]["trl"]
    assert "| numbers | 0 |" in third["table"]
    with pytest.raises(SystemExit, match="no kept runs"):  # other settings: none match
        bench(argv + ["--lr", "0.002", "--summarize"])


@pytest.mark.slow
def test_learn_suite_runs_the_offline_dpo_anchor(tiny_model_dir, tmp_path):
    argv = ["learn", "--suite", "quick", "--votes-cap", "4", "--sides", "duet,dpo",
            "--model", str(tiny_model_dir), "--device", "cpu", "--eval-prompts", "2",
            "--max-new-tokens", "6", "--learn-every", "2", "--out", str(tmp_path)]
    bench(argv)
    first = result(tmp_path, "learn-suite-quick")
    assert [r["oracle"] for r in first["runs"]] == ["numbers", "you"]
    assert all([e["votes"] for e in r["dpo"]] == [0, 4] and "trl" not in r
               for r in first["runs"])
    assert len(list((tmp_path / "dpo-cache").glob("*.json"))) == 2
    assert "| oracle | seed | Duet / TRL / DPO @32 |" in first["table"]
    assert "| numbers | 0 |" in first["table"] and " / - / " in first["table"]  # no TRL side
    bench(argv)  # cached: the same DPO curves come back without a run
    second = result(tmp_path, "learn-suite-quick")
    assert [r["dpo"] for r in second["runs"]] == [r["dpo"] for r in first["runs"]]


def test_offline_dpo_moves_the_policy_toward_the_chosen_replies(tiny_model_dir, tmp_path):
    import dataclasses

    from bench.dpo_baseline import labelled_pairs, reply_logprobs, train_dpo
    from bench.oracles import make_oracle
    from chatbot.config import Config

    config = Config(model=str(tiny_model_dir), device="cpu", dtype="float32",
                    max_new_tokens=8, cache_dir=tmp_path / "cache")
    pairs = labelled_pairs(config, make_oracle("numbers", 0), ["Say hi.", "Count to three."],
                           8, seed=0)
    assert len(pairs) == 8 and all(vote in ("A", "B", "tie") for _, vote in pairs)
    pairs = [(pair, "A") for pair, _ in pairs]  # a user who always picks the first reply
    model, trained = train_dpo(dataclasses.replace(config, seed=0), pairs, seed=0)
    assert trained == sum(bool(p.replies[0].token_ids and p.replies[1].token_ids)
                          for p, _ in pairs) > 0

    pad = model.config.pad_token_id

    def margins():
        with torch.no_grad():
            chosen = reply_logprobs(model, [(p.prompt_token_ids, p.replies[0].token_ids)
                                            for p, _ in pairs], pad, "cpu")
            rejected = reply_logprobs(model, [(p.prompt_token_ids, p.replies[1].token_ids)
                                              for p, _ in pairs], pad, "cpu")
        return chosen - rejected

    after = margins()
    with model.disable_adapter():
        before = margins()
    assert (after - before).mean().item() > 0.5  # the chosen replies gained on the rejected


def test_a_rise_bought_by_cutting_the_replies_short_counts_as_none():
    """The learning suite's gain at length: a side whose replies fall under 70% of the base's
    words keeps a fall in the feature's share but not a rise; the summary counts such runs and
    pairs Duet's gain at length with each anchor's."""
    from bench.suite import LENGTH_FLOOR, gain_at_length, summarize

    def curve(share: float, words: float) -> list[dict]:
        base = {"base_satisfied_share": 0.25, "base_mean_words": 40.0, "win_rate": 0.5,
                "kl_per_token": 0.1}
        return [{**base, "votes": 0, "satisfied_share": 0.25, "mean_words": 40.0},
                {**base, "votes": 32, "satisfied_share": share, "mean_words": words}]

    cut = curve(0.75, 8.0)[1]  # +0.5 with replies at a fifth of the base's words
    assert gain_at_length(cut) == 0.0
    assert gain_at_length({**cut, "satisfied_share": 0.125}) == -0.125  # a fall counts
    assert gain_at_length({**cut, "mean_words": 40.0 * LENGTH_FLOOR}) == 0.5  # at the floor
    runs = [{"duet": curve(0.5, 36.0), "trl": curve(0.25, 40.0), "dpo": curve(0.75, 8.0)},
            {"duet": curve(0.375, 30.0), "trl": curve(0.375, 44.0), "dpo": curve(0.5, 32.0)}]
    at32 = summarize(runs)["32"]
    assert at32["dpo_satisfied_gain"]["mean"] == pytest.approx(0.375)
    assert at32["dpo_satisfied_gain_at_length"]["mean"] == pytest.approx(0.125)
    assert at32["dpo_under_length_floor"] == 1 and at32["duet_under_length_floor"] == 0
    assert at32["duet_satisfied_gain_at_length"]["mean"] == pytest.approx(0.1875)
    assert at32["duet_minus_dpo_gain_at_length"]["mean"] == pytest.approx(0.0625)
    assert at32["duet_words_ratio"]["mean"] == pytest.approx((0.9 + 0.75) / 2)


def test_the_suites_key_leaves_out_only_files_a_simulated_run_never_loads(tmp_path,
                                                                          monkeypatch):
    """A change to a serving engine keeps the kept runs; a change to what a run executes does
    not; a run that loaded a left-out file is refused. (The learning test checks, on a real
    run, that none of them is loaded.)"""
    import shutil

    from bench import suite
    from chatbot.config import Config

    assert all((suite.ROOT / name).is_file() for name in suite.NOT_IN_SIMULATION)
    assert {"bench/suite.py", "chatbot/config.py"} <= suite.sources_loaded()
    for folder in ("chatbot", "learner", "bench"):  # a copy of the sources to edit
        shutil.copytree(suite.ROOT / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("results", "__pycache__"))
    monkeypatch.setattr(suite, "ROOT", tmp_path)

    def key():
        return suite.duet_key(Config(), "numbers", 0, 64, 16)

    before = key()
    with open(tmp_path / "chatbot" / "llama_engine.py", "a") as f:
        f.write("# an engine change\n")
    assert key() == before
    with open(tmp_path / "chatbot" / "sampling.py", "a") as f:
        f.write("# a sampling change\n")
    assert key() != before
    suite.check_left_out_of_key({"chatbot/sampling.py", "learner/worker.py"})
    with pytest.raises(RuntimeError, match="chatbot/llama_engine.py"):
        suite.check_left_out_of_key({"chatbot/sampling.py", "chatbot/llama_engine.py"})


def test_mean_ci_over_runs():
    from bench.suite import mean_ci

    assert mean_ci([0.1]) == {"mean": 0.1, "ci": None, "n": 1}
    summary = mean_ci([0.0, 0.2, 0.1, 0.1])
    assert summary["mean"] == pytest.approx(0.1)
    low, high = summary["ci"]
    assert low < 0.1 < high and high - low == pytest.approx(2 * 3.18 * 0.0816 / 2, rel=0.01)


def test_pair_runs(tiny_model_dir, tmp_path):
    bench(["pair", "--model", str(tiny_model_dir), "--device", "cpu", "--new-tokens", "4",
           "--repeats", "2", "--dtype", "float32", "--out", str(tmp_path)])
    results = result(tmp_path, "pair-cpu")
    assert results["pair_over_single"] > 0
    assert 0 < results["time_to_first_token_seconds_median"] < results["pair_seconds_median"] * 5


def test_decode_runs_every_dtype_and_times_the_stream(tiny_model_dir, tmp_path):
    bench(["decode", "--model", str(tiny_model_dir), "--device", "cpu", "--new-tokens", "4",
           "--repeats", "1", "--dtypes", "float32,bfloat16", "--bandwidth-mb", "8",
           "--out", str(tmp_path)])
    results = result(tmp_path, "decode-cpu")
    assert results["bandwidth"]["read_gb_per_s"] > 0
    fp32, bf16 = results["dtypes"]["float32"], results["dtypes"]["bfloat16"]
    assert fp32["weight_bytes_per_step"] == 2 * bf16["weight_bytes_per_step"]
    for numbers in (fp32, bf16):
        assert numbers["limit_ms_per_token"] > 0 and numbers["pair_over_single"] > 0
        assert numbers["pair_streamed_seconds"] > 0 and numbers["pair_hooked_seconds"] > 0
    # each dtype again with the pair kernels off: plain generate only
    for dtype in ("float32", "bfloat16"):
        off = results["dtypes"][f"{dtype}, pair kernels off"]
        assert off["pair_over_single"] > 0 and off["pair_streamed_seconds"] is None


def test_decode_on_a_gpu_times_generate_against_the_servers_cuda_graphs():
    from bench.decode import variants

    timed = variants(["bfloat16"], torch.device("cuda"), compare_pair_kernels=True, int4=True,
                     adapter=True)
    assert [(v.label, v.quantize, v.graphs, v.served) for v in timed] == [
        ("bfloat16, generate", "none", False, False),
        ("bfloat16, CUDA graphs", "none", True, True),
        ("4-bit NF4, bf16, generate", "4bit", False, False),
        ("4-bit NF4, bf16, CUDA graphs", "4bit", True, True),
        ("bfloat16, CUDA graphs + adapter", "none", True, True),
        ("4-bit NF4, bf16, CUDA graphs + adapter", "4bit", True, True)]
    assert all(v.adapter for v in timed[4:]) and not any(v.adapter for v in timed[:4])


@pytest.mark.slow  # compiles the decode step for four shapes: ~15 s
def test_decode_times_4bit_weights_as_served_compiled_and_with_an_adapter(tiny_model_dir,
                                                                          tmp_path):
    from chatbot.int4 import unavailable

    if unavailable():
        pytest.skip(unavailable())
    bench(["decode", "--model", str(tiny_model_dir), "--device", "cpu", "--new-tokens", "4",
           "--repeats", "1", "--dtypes", "bfloat16", "--bandwidth-mb", "8",
           "--no-compare-pair-kernels", "--int4", "--adapter", "--out", str(tmp_path)])
    results = result(tmp_path, "decode-cpu")["dtypes"]
    bf16 = results["bfloat16"]
    assert set(results) == {"bfloat16", "4-bit weights, bf16",
                            "4-bit weights, bf16, compiled static cache", "bfloat16 + adapter",
                            "4-bit weights, bf16 + adapter"}
    for label in ("4-bit weights, bf16", "4-bit weights, bf16, compiled static cache"):
        numbers = results[label]
        # the tiny model's output layer (tied, 49152 x 64) stays bf16 and is most of its bytes
        assert numbers["weight_bytes_per_step"] < bf16["weight_bytes_per_step"]
        assert numbers["pair_over_single"] > 0 and numbers["warm_up_seconds"] > 0
    # the 4-bit model as the server loads it is timed on the streaming path too
    assert results["4-bit weights, bf16"]["pair_streamed_seconds"] > 0
    assert results["4-bit weights, bf16, compiled static cache"]["pair_streamed_seconds"] is None
    for label in ("bfloat16", "4-bit weights, bf16"):
        # an adapter's LoRA weights are read by every step too
        with_adapter = results[f"{label} + adapter"]
        assert with_adapter["weight_bytes_per_step"] > results[label]["weight_bytes_per_step"]
        assert with_adapter["pair_streamed_seconds"] > 0


def test_llama_bench_output_is_read_as_ms_per_token():
    from bench.llama_cpp import decode_result

    # llama-bench -p 0 -n 64 -t 2 -r 3 -o json on the embedded GGUF (fields cut to those read)
    output = json.dumps([{"model_type": "llama 256M Q4_1", "model_size": 96576768,
                          "n_threads": 2, "n_prompt": 0, "n_gen": 64, "avg_ts": 90.474857,
                          "stddev_ts": 0.99974, "samples_ts": [91.4191, 89.4276, 90.5778]}])
    result = decode_result(output)
    assert result["ms_per_token"] == pytest.approx(1000 / 90.474857)
    assert result["threads"] == 2 and result["tokens"] == 64
    assert result["model_bytes"] == 96576768
    # a prompt-processing test alone is not a decode figure
    with pytest.raises(ValueError, match="no generation"):
        decode_result(json.dumps([{"n_prompt": 512, "n_gen": 0, "avg_ts": 900.0}]))


def test_decode_arithmetic(tiny_loaded):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.decode import bandwidth_limit_ms, step_seconds, weight_bytes_per_step

    # 64 tokens in 3.2 s, 1 token in 0.05 s: 63 steps of 50 ms
    assert step_seconds(3.2, 0.05, 64) == pytest.approx(0.05)
    assert bandwidth_limit_ms(500_000_000, 10e9) == pytest.approx(50.0)
    # tied embeddings: the output layer reads the shared matrix, counted once
    model = tiny_loaded.model
    every = sum(p.numel() * 4 for p in model.parameters())
    assert weight_bytes_per_step(model) == every
    # untied: a step reads one row of the input embedding, so it is left out
    untied = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          tie_word_embeddings=False))
    all_bytes = sum(p.numel() * 4 for p in untied.parameters())
    assert weight_bytes_per_step(untied) == all_bytes - 100 * 16 * 4
    assert weight_bytes_per_step(untied.to(torch.bfloat16)) == (all_bytes - 100 * 16 * 4) // 2


def test_learner_round_runs(tiny_model_dir, tmp_path):
    bench(["learner", "--model", str(tiny_model_dir), "--device", "cpu", "--pairs", "2,4",
           "--reply-tokens", "6", "--repeats", "1", "--out", str(tmp_path)])
    rounds = result(tmp_path, "learner-cpu")["rounds"]
    assert [r["pairs"] for r in rounds] == [2, 4]
    assert all(r["round_seconds"] > 0 and r["floor_seconds"] > 0 for r in rounds)
    for r in rounds:  # every phase ran, and the phases before publishing are parts of the round
        phases = r["phase_seconds"]
        assert set(phases) == {"sync_to_live", "reference", "margins", "train", "preview",
                               "kl_check", "publish"}, phases
        assert all(phases[name] > 0 for name in ("reference", "train", "preview", "kl_check",
                                                 "publish"))
        assert sum(v for k, v in phases.items() if k != "publish") <= r["round_seconds"]


def test_shared_prompts_runs(tiny_model_dir, tmp_path):
    bench(["shared-prompts", "--model", str(tiny_model_dir), "--device", "cpu",
           "--prompt-tokens", "4,40", "--reply-tokens", "6", "--repeats", "1",
           "--out", str(tmp_path)])
    rows = result(tmp_path, "shared-prompts-cpu")["rows"]
    assert [r["prompt_tokens"] for r in rows] == [4, 40]
    assert [r["shared_by_default"] for r in rows] == [False, True]
    assert all(r["forward_seconds"]["shared"] > 0 and r["forward_seconds"]["rows"] > 0
               for r in rows)


@pytest.mark.slow
def test_swap_runs(tiny_model_dir, tmp_path):
    bench(["swap", "--model", str(tiny_model_dir), "--device", "cpu", "--swaps", "3",
           "--memory-swaps", "4", "--versions", "2", "--load-swaps", "10", "--load-clients", "2",
           "--load-tokens", "4", "--dtype", "float32", "--out", str(tmp_path)])
    results = result(tmp_path, "swap-cpu")
    assert len(results["swap_ms"]) == 3 and results["swap_ms_max"] >= results["swap_ms_median"]
    assert len(results["blocking_ms"]) == 3
    assert 0 <= results["blocking_ms_median"] <= results["swap_ms_median"]
    load = results["under_load"]
    assert load["swaps"] == 10 and load["failed_requests"] == 0, load["failures"]
    assert load["requests_served"] >= 1 and load["pairs_stored"] == load["requests_served"]
    # tracked at the 10th swap: the pairs served by then, the threads, no CUDA on a CPU
    assert len(load["rss_mb_every_10_swaps"]) == 1
    assert 1 <= load["pairs_every_10_swaps"][0] <= load["requests_served"]
    assert load["threads_every_10_swaps"][0] >= 3  # the main thread and the two users
    assert load["cuda_mb_every_10_swaps"] is None
    assert sum(load["versions_served"].values()) == load["requests_served"]
    assert set(load["versions_served"]) <= {"1", "2"}


@pytest.mark.processes  # the real server and learner
def test_latency_runs(tiny_model_dir, tmp_path):
    bench(["latency", "--model", str(tiny_model_dir), "--rounds", "1", "--learn-every", "2",
           "--max-new-tokens", "4", "--read-seconds", "0.1", "--pair-kernels", "off",
           "--out", str(tmp_path)])
    results = result(tmp_path, "latency")
    row = results["rounds"][0]
    assert row["outcome"] == "live", row  # two votes one way: the tiny model's KL stays small
    # the round starts after the vote that completed it, and ends before its version is live;
    # a version trained on the vote (the round's first step: the preview) may be live before
    assert 0 <= row["vote_to_round_start_seconds"] < row["vote_to_live_seconds"]
    assert row["vote_to_live_seconds"] <= row["vote_to_round_live_seconds"]
    # the first version served after the vote: the preview, or the round's own (the preview is
    # live for moments on the tiny model; a round of ties takes no step, and has none)
    assert row["first_live_version"] in ((row["preview"] or {}).get("version"), row["version"])
    assert results["vote_to_live_seconds_median"] == row["vote_to_live_seconds"]
    assert len(results["pair_steps_while_voting"]) == 2  # one pair per vote
    # the idle pair's time per decode step: its longer reply ran 1-4 tokens
    assert len(results["pair_steps_idle"]) == 1 and 1 <= results["pair_steps_idle"][0] <= 4
    assert results["ms_per_step_idle_median"] == pytest.approx(
        1000 * results["pair_seconds_idle"][0] / results["pair_steps_idle"][0])


@pytest.mark.processes  # a real `python app.py`
def test_api_user_runs(tiny_model_dir, tmp_path):
    bench(["api-user", "--model", str(tiny_model_dir), "--votes", "4", "--eval-prompts", "2",
           "--max-new-tokens", "4", "--correct-every", "2", "--correction-text",
           "Here is an answer for you.", "--correction-text", "Let me show you how.",
           "--out", str(tmp_path), "--extra", "--learn-every", "2", "--length-neutral", "1"])
    results = result(tmp_path, "api-user-you")
    settings = json.loads((tmp_path / "api-user-you.json").read_text())["settings"]
    assert settings["correction_text"] == ["Here is an answer for you.", "Let me show you how."]
    assert results["before"]["replies"] == results["after"]["replies"] == 4
    assert len(results["after_texts"]) == 4
    assert sum(results["votes"].values()) == 4
    # the tiny model's replies never say "you": each due correction is made
    assert results["corrections"] == 2
    assert results["live_adapter_version"] >= 1 and len(results["rounds"]) >= 1
    assert results["votes_pending_when_measured"] == 0  # the learner used every vote
    assert results["corrections_pending_when_measured"] == 0  # and every correction
    assert results["vote_to_live_seconds_median"] > 0
    assert 0.0 <= results["p_value_one_sided"] <= 1.0
    assert "shorter_won" in results
    assert set(results["feature_decided"]) == {"votes", "won_by_feature", "feature_in_shorter"}
    assert all("beta" in step for step in results["rounds"])
    # where each round's loss came from: its KL part and its largest token term
    promoted = [r for r in results["rounds"] if r["status"] == "promoted"]
    assert promoted and all(r["largest_term"]["kind"] in ("reply", "rewrite", "own sample")
                            and r["kl_loss"] is not None for r in promoted)
    # and the rest of its adapter metrics: the length-neutral rate it used; no reward model
    assert all(isinstance(r["shorter_wins"], float) for r in promoted)
    assert all(r["reward_model_cv_acc"] is None for r in promoted)
    # the base's held-out replies read again, learner off, as `--read-base` reads them: the
    # same server flags, prompts and order give the very replies the run read before
    from bench.api_user import read_held_out

    again = read_held_out(seed=0, eval_prompts=2, eval_replies=2, max_new_tokens=4,
                          model=str(tiny_model_dir), extra=["--learn-every", "2"])
    assert again == results["before"]["sample"]


def test_the_share_of_votes_the_shorter_reply_won():
    from bench.api_user import shorter_won

    assert shorter_won([("A", "a b", "a b c"),  # A, the shorter, won
                        ("B", "a b", "a"),  # B, the shorter, won
                        ("A", "x", "y"),  # equal lengths: not counted
                        ("B", "a", "a b c")]) == pytest.approx(2 / 3)  # the longer won
    assert shorter_won([("A", "x", "y")]) is None


def test_the_votes_the_users_feature_decided_are_counted():
    from bench.api_user import feature_decided

    votes = [("A", "I can go.", "No."),  # the feature won, in the longer reply
             ("B", "Yes.", "You can."),  # the feature won, in the longer reply
             ("A", "Go.", "It can be done."),  # the tie-break won over the feature
             ("B", "Go on.", "Stop."),  # neither has it: the tie-break's vote
             ("A", "Can do.", "We can do it all.")]  # both have it
    assert feature_decided(votes, make_oracle("can")) == {
        "votes": 3, "won_by_feature": 2, "feature_in_shorter": 0}
    assert feature_decided([("B", "Can.", "No, not that one.")], make_oracle("can")) == {
        "votes": 1, "won_by_feature": 0, "feature_in_shorter": 1}


def test_a_simulated_correction_puts_the_feature_first_and_keeps_the_reply():
    from bench.oracles import corrected

    oracle = make_oracle("can")
    assert corrected(oracle, "Rain falls.", "I can help.") == "I can help. Rain falls."
    assert corrected(oracle, "You can see it.", "I can help.") is None  # nothing to fix
    with pytest.raises(ValueError, match="does not have the feature"):
        corrected(oracle, "Rain falls.", "Hello there.")


def test_a_suite_runs_only_the_users_named_and_says_which_it_has(tmp_path, monkeypatch,
                                                                  capsys):
    import sys

    from bench import user_suite
    from bench.__main__ import build_parser, cli

    made = []
    monkeypatch.setattr(user_suite, "run_to_file",
                        lambda args, path, folder, name, *rest, **kw: made.append(path.name))
    def argv(users: str) -> list[str]:
        return ["api-user", "--suite", "unseen-varied-reader-64-wide", "--suite-users", users,
                "--out", str(tmp_path)]

    with pytest.raises(ValueError, match="no runs of the suite"):  # the stub kept none
        user_suite.run_suite(build_parser()[0].parse_args(argv("long-word")))
    assert made == ["long-word-s0-reader-every8.json", "long-word-s1-reader-every8.json"]
    suite = user_suite.SUITES["unseen-varied-reader-64-wide"]
    assert user_suite.suite_users(suite, None) == set(suite.users)
    assert user_suite.suite_users(suite, " opener,long-word ") == {"opener", "long-word"}
    # a name the suite has not: one line on stderr that names its users, exit 2, nothing run
    made.clear()
    monkeypatch.setattr(sys, "argv", ["bench", *argv("long-word,tall")])
    assert cli() == 2
    error = capsys.readouterr().err
    assert error.startswith("python -m bench: error: not a user of this suite: tall")
    assert "long-word, opener, first-person, noisy-for" in error and "Traceback" not in error
    assert made == []
    # any other error (a bug) keeps its traceback
    import bench.__main__ as bench_main

    def broken():
        raise ValueError("a bug")

    monkeypatch.setattr(bench_main, "main", broken)
    with pytest.raises(ValueError, match="a bug"):
        cli()


def test_a_suite_takes_only_users_in_the_claims_range(tmp_path):
    from bench.oracles import corrected
    from bench.user_suite import USERS, check_user

    first = tmp_path / "feature-share.json"
    first.write_text(json.dumps({"results": {"features": {
        "can": {"reply_share": 0.29}, "you": {"reply_share": 0.08}}}}))
    shares = (first, tmp_path / "not-measured.json")
    oracle, sentences = check_user("can", shares)
    assert oracle == "can" and sentences[0] == "Here is what I can tell you."
    for name, (feature, sentences) in USERS.items():  # every sentence a user may write fits
        assert len(set(sentences)) == len(sentences) == 6, name
        for sentence in sentences:
            assert corrected(make_oracle(feature), "Rain falls.", sentence), (name, sentence)
    assert check_user("noisy-can", shares)[0] == "noisy-can"
    with pytest.raises(ValueError, match="8% of the base model's replies, outside"):
        check_user("you", shares)
    with pytest.raises(ValueError, match="not measured"):
        check_user("numbers", shares)
    with pytest.raises(ValueError, match="no suite user"):
        check_user("tall", shares)
    # a second file adds features; where both have one, the first file's share counts
    second = tmp_path / "feature-share-more.json"
    second.write_text(json.dumps({"results": {"features": {
        "you": {"reply_share": 0.30}, "numbers": {"reply_share": 0.31}}}}))
    assert check_user("numbers", (first, second))[0] == "numbers"
    with pytest.raises(ValueError, match="8% of the base model's replies, outside"):
        check_user("you", (first, second))


def test_feature_share_counts_replies_and_differing_pairs(tiny_model_dir, tmp_path):
    from bench.feature_share import shares

    oracle = make_oracle("re:x")
    row = shares(oracle, [("x", "x"), ("x", "y"), ("y", "y"), ("y", "x")])
    assert row == {"reply_share": 0.5, "differing_pair_share": 0.5}
    bench(["feature-share", "--model", str(tiny_model_dir), "--device", "cpu", "--pattern",
           "numbers", "--pattern", "re:.", "--prompts-used", "3", "--batch", "2",
           "--max-new-tokens", "4", "--out", str(tmp_path)])
    results = result(tmp_path, "feature-share")
    assert results["pairs"] == 3
    assert set(results["features"]) == {"numbers", "re:."}
    assert 0.0 <= results["features"]["numbers"]["reply_share"] <= 1.0
    with pytest.raises(ValueError, match="not a regular expression"):
        bench(["feature-share", "--model", str(tiny_model_dir), "--pattern", "re:(",
               "--out", str(tmp_path)])


def test_feature_share_compares_the_most_different_pair_with_a_plain_one(tiny_model_dir,
                                                                          tmp_path):
    from bench.feature_share import chosen_pair_shares

    # prompt 1: the plain pair (0, 1) agrees on x; the chosen one, (1, 2) (of the same length,
    # nothing in common), does not. Prompt 2: every candidate has x, so no pair can differ;
    # no two are of similar length, and (1, 2) differ most.
    row = chosen_pair_shares(make_oracle("re:x"), [["x a", "x a b", "q r s"],
                                                    ["x", "x y", "x z w v"]])
    assert row["plain_pair_differs"] == 0.0
    assert row["most_different_pair_differs"] == 0.5
    assert row["some_pair_differs"] == 0.5
    assert row["plain_pair_word_gap"] == 1.0  # (1 + 1) / 2
    assert row["most_different_pair_word_gap"] == 1.0  # (0 + 2) / 2
    bench(["feature-share", "--model", str(tiny_model_dir), "--device", "cpu", "--pattern",
           "re:.", "--prompts-used", "2", "--candidates", "3", "--max-new-tokens", "4",
           "--out", str(tmp_path)])
    results = result(tmp_path, "feature-share-candidates3")
    assert results["pairs"] == 2
    assert set(results["features"]["re:."]) >= {"most_different_pair_differs",
                                                "some_pair_differs"}
    assert not (tmp_path / "feature-share.json").exists()  # the suite's shares stay as they were


def test_feature_share_compares_an_exploring_pair_with_a_plain_one(tiny_model_dir, tmp_path):
    from bench.feature_share import exploring_pair_shares

    # prompt 1: the plain pair agrees on x, the exploring reply lacks it; prompt 2: all have x
    row = exploring_pair_shares(make_oracle("re:x"), [("x a", "x b c"), ("x", "x")],
                                ["q r s t", "x y"])
    assert row == {"explore_reply_share": 0.5, "exploring_pair_differs": 0.5,
                   "plain_pair_differs": 0.0, "exploring_pair_word_gap": 1.5,
                   "plain_pair_word_gap": 0.5}
    bench(["feature-share", "--model", str(tiny_model_dir), "--device", "cpu", "--pattern",
           "re:.", "--prompts-used", "3", "--batch", "2", "--explore-temperature", "1.3",
           "--max-new-tokens", "4", "--out", str(tmp_path)])
    results = result(tmp_path, "feature-share-explore1.3")
    assert results["pairs"] == 3
    assert set(results["features"]["re:."]) >= {"exploring_pair_differs", "explore_reply_share"}
    assert not (tmp_path / "feature-share.json").exists()


def test_a_reward_model_on_the_votes_chooses_pairs_that_differ_once_it_knows(tiny_model_dir,
                                                                             tmp_path):
    """pair-choice: candidates whose first feature says whether they have an x. A plain pair
    differs in x as often as chance has it; the reward-model rule, once its model has votes
    enough to beat a coin, shows a pair that differs wherever some two candidates do."""
    import random

    from bench.choice import RULES, reward_choice, simulate

    assert reward_choice([0.0, 2.0, -1.0], [3, 3, 3]) == (1, 2)
    assert reward_choice([0.0, 2.0, -1.0], [3, 30, 3]) == (0, 2)  # the long one is left out
    rng = random.Random(0)
    texts, features = [], []
    for _ in range(96):
        has = [rng.random() < 0.3 for _ in range(4)]
        texts.append(["x b c" if h else "a b c" for h in has])
        features.append(torch.tensor([[float(h)] + [rng.gauss(0, 1) for _ in range(3)]
                                      for h in has]))
    row = simulate(make_oracle("re:\\bx\\b"), texts, features, 4, random.Random(0))
    for name in ("reward_model", "reward_model_less_length"):
        assert row[name]["knows_from_prompt"] is not None
        assert row[name]["knows_from_prompt"] < 48
    later = {rule: row[rule]["differs_later_half"] for rule in RULES}
    assert later["reward_model"] == later["ceiling"] > later["plain"] + 0.2
    assert later["reward_model_less_length"] == later["ceiling"]
    bench(["pair-choice", "--model", str(tiny_model_dir), "--device", "cpu", "--pattern",
           "re:.", "--pattern", "noisy-numbers", "--prompts-used", "3", "--candidates", "3",
           "--batch", "2", "--max-new-tokens", "4", "--out", str(tmp_path)])
    results = result(tmp_path, "pair-choice-candidates3")
    assert set(results["users"]) == {"re:.", "noisy-numbers"}
    assert set(results["users"]["re:."]) == set(RULES)


def test_held_out_replies_are_single_samples_where_the_server_chooses_its_pairs():
    from types import SimpleNamespace

    from bench.api_user import chooses_pairs, held_out_texts

    assert not chooses_pairs([]) and not chooses_pairs(["--pair-candidates", "2"])
    assert chooses_pairs(["--length-neutral", "1", "--pair-candidates", "4"])
    assert chooses_pairs(["--pair-candidates=3"])
    assert chooses_pairs(["--explore-temperature", "1.2"])
    assert not chooses_pairs(["--explore-temperature", "0"])
    asked = []

    def create(model, messages, n):
        asked.append(n)
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(
            content=f"{messages[0]['content']} {i}")) for i in range(n)])

    client = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))
    assert held_out_texts(client, ["p", "q"], 3) == ["p 0", "p 1", "p 0", "q 0", "q 1", "q 0"]
    assert asked == [2, 1, 2, 1]
    asked.clear()
    assert held_out_texts(client, ["p"], 2, pairs=False) == ["p 0", "p 0"]
    assert asked == [1, 1]


def test_one_sided_two_proportion_p():
    from bench.api_user import one_sided_p

    assert one_sided_p(10, 10, 64) == pytest.approx(0.5)
    assert one_sided_p(10, 30, 64) < 0.001 < 0.99 < one_sided_p(30, 10, 64)
    assert one_sided_p(0, 0, 64) == 1.0


def test_the_stratified_test_counts_only_prompts_that_can_change():
    """Prompts whose replies all have the feature, or none do, before and after, carry no
    information: the same gain is stronger evidence among prompts that vary."""
    from bench.api_user import one_sided_p, stratified_p

    assert 0.5 < stratified_p([1] * 8, [1] * 8, 2) < 0.7  # no change: the upper tail and tie
    assert stratified_p([2, 0] * 4, [2, 0] * 4, 2) == 1.0  # nothing could change
    rising = stratified_p([0] * 8 + [2] * 8 + [0] * 16, [1] * 8 + [2] * 8 + [0] * 16, 2)
    assert rising < 0.01 and one_sided_p(16, 24, 64) > 0.05  # the same 16 -> 24 of 64, pooled
    assert stratified_p([1] * 8, [0] * 8, 2) > 0.99


def test_the_stratified_test_is_exact():
    """The p-value is the conditional tail itself: on three prompts it equals the count of
    within-prompt relabellings of before and after replies that give as many satisfied after;
    and under no change, with prompts that differ in how often they have the feature, it
    rejects at 5% no more than 5% of the time."""
    import itertools
    import random

    from bench.api_user import stratified_p

    before, after = [0, 1, 2], [1, 2, 2]  # satisfied replies per prompt, 2 replies each
    labels = []  # per prompt: the 4 replies' hits, any 2 of which could be the "after" ones
    for b, a in zip(before, after):
        hits = [1] * (a + b) + [0] * (4 - a - b)
        labels.append([sum(hits[i] for i in chosen)
                       for chosen in itertools.combinations(range(4), 2)])
    tails = [sum(combo) >= sum(after) for combo in itertools.product(*labels)]
    assert stratified_p(before, after, 2) == pytest.approx(sum(tails) / len(tails))

    rng = random.Random(0)
    rates = [rng.choice([0.0, 0.1, 0.4, 0.7, 1.0]) for _ in range(32)]  # per prompt
    rejected = 0
    for _ in range(400):
        draw = [[sum(rng.random() < q for _ in range(2)) for q in rates] for _ in range(2)]
        rejected += stratified_p(draw[0], draw[1], 2) < 0.05
    assert rejected / 400 <= 0.05


def test_store_bench_times_both_databases(tmp_path, postgres_url):
    assert bench(["store", "--n", "3", "--warmup", "1", "--pg-url", postgres_url,
                  "--out", str(tmp_path)]) == 0
    results = result(tmp_path, "store-cpu")
    for database in ("sqlite", "postgresql"):
        for op in ("ask_new_conversation", "vote", "ask_in_conversation", "status_poll"):
            assert 0 < results[database][op]["median_ms"] < 10_000
    assert results["postgresql_over_sqlite_median"]["vote"] > 0


@pytest.mark.slow
def test_sweep_runs_variants_on_the_same_users_and_pairs_them(tiny_model_dir, tmp_path):
    assert bench(["sweep", "--model", str(tiny_model_dir), "--device", "cpu",
                  "--variant", "plain=", "--variant", "noreplay=--replay 0 --lr 0.002",
                  "--oracle", "numbers", "--oracle", "re:a", "--votes", "4",
                  "--learn-every", "2", "--round-every", "4", "--checkpoints", "0,4",
                  "--eval-prompts", "1", "--max-new-tokens", "4", "--tag", "t",
                  "--out", str(tmp_path)]) == 0
    results = result(tmp_path, "sweep-t")
    runs = results["runs"]
    assert sorted((r["variant"], r["oracle"]) for r in runs) == [
        ("noreplay", "numbers"), ("noreplay", "re:a"), ("plain", "numbers"), ("plain", "re:a")]
    assert all(r["complete"] and [e["votes"] for e in r["curve"]] == [0, 4] for r in runs)
    # the learner fell behind: one round of 4 votes, two slices of learn_every = 2
    assert all([s["new_votes"] for s in r["rounds"]] == [4] for r in runs)
    settings = json.loads((tmp_path / "sweep-t.json").read_text())["settings"]
    assert settings["variants"] == {"plain": "", "noreplay": "--replay 0 --lr 0.002"}
    at4 = results["summary"]["4"]
    assert at4["plain"]["runs"] == at4["noreplay"]["runs"] == 2
    assert at4["noreplay_minus_plain"]["runs"] == 2
    assert (tmp_path / "sweep-t" / "plain-numbers-s0.json").exists()
    with pytest.raises(SystemExit):
        bench(["sweep", "--variant", "no flags here", "--oracle", "numbers"])


def test_the_api_user_suite_pairs_each_arm_with_votes_only():
    from bench.user_suite import headline

    def run(user, every, before, after, p):
        return {"settings": {"user": user, "seed": 0, "pace": "instant", "correct_every": every},
                "results": {"satisfied_share_before": before, "satisfied_share_after": after,
                            "p_value_one_sided": p, "length_ratio": 0.9}}

    out = headline([run("a", 0, 0.3, 0.4, 0.2), run("a", 8, 0.3, 0.6, 0.01),
                    run("b", 0, 0.3, 0.2, 0.9), run("b", 8, 0.3, 0.3, 0.5)])
    assert out["instant-every8"]["significant_share"] == 0.5
    assert out["instant-every0"]["gain"]["mean"] == pytest.approx(0.0)
    assert out["instant-every8-minus-votes-only"]["mean"] == pytest.approx(0.15)  # 0.2, 0.1
    assert out["instant-every8-minus-votes-only"]["n"] == 2
    assert out["instant-every8"]["significant_share_by_prompt"] is None  # no per-prompt counts

    rising = run("a", 0, 0.0, 0.25, 0.2)  # 8 prompts of 32 gain a satisfied reply of 2
    rising["results"].update(before={"satisfied_by_prompt": [0] * 32},
                             after={"satisfied_by_prompt": [1] * 8 + [0] * 24})
    flat = run("b", 0, 0.25, 0.25, 0.5)
    flat["results"].update(before={"satisfied_by_prompt": [1] * 16 + [0] * 16},
                           after={"satisfied_by_prompt": [0] * 16 + [1] * 16})
    assert headline([rising, flat])["instant-every0"]["significant_share_by_prompt"] == 0.5


def test_a_suite_that_tries_a_rule_is_paired_with_the_suite_without_it():
    """length-neutral-reader runs the reader-pace users with --length-neutral 1 and is read
    beside corrections-reader, run by run: the rule's gain minus the baseline's."""
    from bench.user_suite import SUITES, paired_gains, paired_table

    suite = SUITES["length-neutral-reader"]
    baseline = SUITES[suite.against]
    assert suite.extra == ("--length-neutral", "1")
    assert set(suite.users) <= set(baseline.users) and set(suite.seeds) <= set(baseline.seeds)
    assert set(suite.paces) <= set(baseline.paces)

    def run(user, before, after, p):
        return {"settings": {"user": user, "seed": 0, "pace": "reader", "correct_every": 0},
                "results": {"satisfied_share_before": before, "satisfied_share_after": after,
                            "p_value_one_sided": p, "length_ratio": 0.9}}

    ours = [run("a", 0.3, 0.5, 0.01), run("b", 0.3, 0.2, 0.9), run("c", 0.3, 0.3, 0.5)]
    theirs = [run("a", 0.3, 0.4, 0.2), run("b", 0.3, 0.3, 0.5)]  # no "c": not paired
    gains = paired_gains(ours, theirs)
    assert gains["n"] == 2 and gains["mean"] == pytest.approx(0.0)  # +0.1 and -0.1
    rows = paired_table(ours, theirs).splitlines()[2:]
    assert len(rows) == 2 and rows[0].endswith("| +0.10 |") and rows[1].endswith("| -0.10 |")
    assert paired_gains(ours, [])["n"] == 0


def test_a_chain_of_paired_suites_is_scored_on_its_last_suites_replies_before():
    """candidates-reader adds --pair-candidates 4 to length-neutral-reader, which is paired
    with corrections-reader: all three read corrections-reader's held-out replies before."""
    from bench.user_suite import SUITES, baseline_of

    suite = SUITES["candidates-reader"]
    assert suite.against == "length-neutral-reader"
    assert set(SUITES[suite.against].extra) < set(suite.extra)
    assert baseline_of("candidates-reader") == baseline_of("length-neutral-reader") \
        == baseline_of("corrections-reader") == "corrections-reader"


def test_every_paired_suite_has_its_baselines_users_seeds_and_paces():
    """A suite read beside another is paired run by run: each of its runs has a run of the
    same user, seed and pace there (defaults-reader-64, 64 interactions, beside the 32 of
    defaults-reader)."""
    from bench.user_suite import SUITES, baseline_of

    for name, suite in SUITES.items():
        if suite.against:
            baseline = SUITES[suite.against]
            assert set(suite.users) <= set(baseline.users), name
            assert set(suite.seeds) <= set(baseline.seeds), name
            assert set(suite.paces) <= set(baseline.paces), name
            assert baseline_of(name) == baseline_of(suite.against)
    assert SUITES["defaults-reader-64"].interactions == 64
    assert SUITES["defaults-reader-64"].correct_every == (8, 0)  # corrections first
    # a suite at another pace is not paired, but is scored on the same replies before
    instant = SUITES["defaults-instant-64"]
    assert instant.against is None and instant.paces == ("instant",)
    assert baseline_of("defaults-instant-64") == baseline_of("defaults-reader-64")
    # a suite scored on another's replies before asks for as many replies per prompt
    for name in SUITES:
        assert SUITES[name].eval_replies == SUITES[baseline_of(name)].eval_replies, name


def test_the_suite_table_has_a_row_per_run_and_reads_runs_from_before_shorter_won():
    from bench.user_suite import table

    def run(user, shorter_won):
        results = {"satisfied_share_before": 0.3, "satisfied_share_after": 0.5,
                   "p_value_one_sided": 0.01, "length_ratio": 0.9, "corrections": 0,
                   "round_sizes": [4, 4], "vote_to_live_seconds_median": 33.0}
        if shorter_won is not None:
            results["shorter_won"] = shorter_won
        return {"settings": {"user": user, "seed": 0, "pace": "reader", "correct_every": 0},
                "results": results}

    decided = run("c", 0.8)
    decided["results"]["feature_decided"] = {"votes": 20, "won_by_feature": 15,
                                             "feature_in_shorter": 9}
    header, rule, old, new, last = table([run("a", None), run("b", 0.8), decided]).splitlines()
    assert header.count("|") == rule.count("|") == old.count("|") == new.count("|")
    assert "| 0.90 | - | - | - | 0 |" in old and "| 0.90 | - | 0.80 | - | 0 |" in new
    assert "| 0.80 | 20 (15; 9) | 0 |" in last


def test_a_runs_gain_is_split_into_what_the_lengths_explain_and_the_rest(tmp_path):
    """Replies before of 10 words have a long word in 20 of 100, of 40 words in 60 of 100
    (share 0.4); replies after of 10 words have it in 12 of 40 (0.3). At the rate before,
    10-word replies have it about 0.2 of the time (a little more: the fit keeps its slope
    small): the lengths took about 0.2 from the share and the rest added about 0.1."""
    from bench.api_user import share_at_length
    from bench.user_suite import gain_by_length, table

    oracle = make_oracle(r"re:\b\w{12,}\b")

    def replies(n_words, with_it, total):
        return [" ".join(["word"] * (n_words - 1) + ["extraordinary" if i < with_it else "plain"])
                for i in range(total)]

    before = replies(10, 20, 100) + replies(40, 60, 100)
    after = replies(10, 12, 40)
    assert share_at_length(before, before, oracle) == pytest.approx(0.4)
    assert share_at_length(before, after, oracle) == pytest.approx(0.2, abs=0.02)
    assert share_at_length(replies(10, 0, 4), after, oracle) == 0.0  # no rate to read
    # the feature only in the longest replies: the ridge keeps the slope finite
    separated = replies(5, 0, 100) + replies(400, 3, 3)
    assert share_at_length(separated, separated, oracle) == pytest.approx(3 / 103)
    assert share_at_length(separated, replies(5, 0, 10), oracle) < 0.01

    kept = tmp_path / "api-user-suite-base"
    kept.mkdir()
    (kept / "before-s0.json").write_text(json.dumps({"texts": before, "read_by": "a.json"}))
    run = {"settings": {"user": "long-word", "seed": 0, "pace": "reader", "correct_every": 0,
                        "oracle": oracle.name},
           "results": {"satisfied_share_before": 0.4, "satisfied_share_after": 0.3,
                       "after_texts": after, "before_from": "api-user-suite-base/a.json",
                       "p_value_one_sided": 0.9, "length_ratio": 0.4, "corrections": 0,
                       "round_sizes": [4], "vote_to_live_seconds_median": 30.0}}
    lengths, rest = gain_by_length(run, tmp_path / "api-user-suite-rule")
    assert lengths == pytest.approx(-0.2, abs=0.02) and rest == pytest.approx(0.1, abs=0.02)
    assert gain_by_length(run) is None  # no folder to find the replies before in
    row = table([run], tmp_path / "api-user-suite-rule").splitlines()[2]
    assert f"| 0.40 | {lengths:+.2f}, {rest:+.2f} |" in row
    run["results"]["satisfied_share_at_length"] = 0.35  # kept by the run itself
    assert gain_by_length(run) == pytest.approx((-0.05, -0.05))


def test_a_run_with_corrections_is_also_scored_without_the_users_sentence():
    """A model that learned to write the user's correction sentence verbatim satisfies the
    simulated user by copying: the suite scores the replies after with the sentence taken
    out, beside the plain share, in the table and the headline."""
    from bench.api_user import less_correction
    from bench.user_suite import headline, table

    sentence = "Here is an answer for you."
    after = [f"{sentence} The sky is blue.", f"{sentence} Ask what you like.",
             "Grass is green.", "It depends on you."]
    scored = less_correction(after, sentence, make_oracle("you"), before_satisfied=1)
    assert scored["satisfied_share_after_less_correction"] == 0.5  # 2 of 4 keep a "you"
    assert scored["replies_with_correction_sentence"] == 2
    assert scored["p_value_less_correction"] > 0.05  # 1 of 4 -> 2 of 4 is no evidence

    def run(every):
        return {"settings": {"user": "you", "seed": 0, "pace": "reader", "correct_every": every,
                             "oracle": "you", "correction_text": sentence if every else None},
                "results": {"satisfied_share_before": 0.25, "satisfied_share_after": 1.0,
                            "p_value_one_sided": 0.01, "length_ratio": 0.9, "corrections": 1,
                            "round_sizes": [4], "vote_to_live_seconds_median": 30.0,
                            "after_texts": after}}

    rows = table([run(8), run(0)]).splitlines()
    assert "| 0.50 (" in rows[2] and "; 2) |" in rows[2]
    assert "| 0.50 (" not in rows[3]
    out = headline([run(8), run(0)])
    assert out["reader-every8"]["less_correction_sentence"]["significant_share"] == 0.0
    assert out["reader-every8"]["less_correction_sentence"]["gain"]["mean"] == 0.25
    assert "less_correction_sentence" not in out["reader-every0"]


def test_a_user_whose_rewrites_vary_is_scored_without_any_of_their_sentences():
    from bench.api_user import correction_sentences, less_correction

    sentences = ["Here is an answer for you.", "Let me show you how."]
    after = [f"{sentences[0]} The sky is blue.", f"{sentences[1]} Grass is green.",
             "Ask what you like.", "Rain falls."]
    scored = less_correction(after, sentences, make_oracle("you"), before_satisfied=1)
    assert scored["satisfied_share_after_less_correction"] == 0.25  # only "Ask what you like."
    assert scored["replies_with_correction_sentence"] == 2
    one = less_correction(after, sentences[0], make_oracle("you"), before_satisfied=1)
    assert one["satisfied_share_after_less_correction"] == 0.5  # the other sentence counts
    assert correction_sentences("a") == ["a"] and correction_sentences(("a", "b")) == ["a", "b"]
    assert correction_sentences(None) == []


def test_a_paired_suite_reads_the_baselines_replies_before_and_writes_only_its_own(
        tmp_path, monkeypatch):
    import argparse

    import bench.user_suite as user_suite

    seen = []

    def fake_run(**kwargs):
        seen.append(kwargs["before_texts"])
        return {"before_texts": kwargs["before_texts"] or ["sampled here"],
                "satisfied_share_before": 0.3, "satisfied_share_after": 0.4}

    monkeypatch.setattr(user_suite, "run_one", fake_run)
    monkeypatch.setattr(user_suite, "summary", lambda result: {})
    args = argparse.Namespace(reader_seconds=10.0, eval_prompts=2, eval_replies=2,
                              max_new_tokens=4, model="m", timeout=1.0, extra=[], prompts=None,
                              votes=32, correct_every=0, correction_text=None, pace="reader")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir(), theirs.mkdir()
    (theirs / "before-s0.json").write_text(json.dumps({"texts": ["theirs"], "read_by": "x"}))
    for seed in (0, 1):  # seed 1: the baseline has no replies before, so the run reads its own
        user_suite.run_to_file(args, ours / f"u-s{seed}-reader-every0.json", ours, "u", "you",
                             "t", seed, "reader", 0, 32, before_folder=theirs)
    assert seen == [["theirs"], None]
    assert sorted(p.name for p in theirs.iterdir()) == ["before-s0.json"]  # left as it was
    assert json.loads((ours / "before-s1.json").read_text())["texts"] == ["sampled here"]
    first = json.loads((ours / "u-s0-reader-every0.json").read_text())["results"]
    assert first["before_from"] == "theirs/x"


def test_length_shift_weighs_the_feature_and_the_tie_break_votes(tmp_path):
    from bench.length_shift import weigh, within_prompt_pairs

    texts = ["Short one.", "A much longer reply for you here.",  # "you" decides: longer wins
             "Tiny.", "Somewhat longer reply.",  # the tie-break: the shorter
             "Yes.", "No way man.",
             "It goes on and on", "It goes"]  # two replies cut at the limit: the shorter
    pairs = within_prompt_pairs(texts, 2)
    plain = weigh("you", pairs, 0.0)
    assert plain["votes"] == 4 and plain["feature_votes"] == 1
    assert plain["feature"] == plain["tie_break"] == 1.0
    # shorter won 3 of 4 votes: (3 + 2) / (4 + 4) with the learner's prior, taste 0.25
    shifted = weigh("you", pairs, 1.0)
    assert shifted["shorter_wins"] == pytest.approx(5 / 8)
    assert shifted["feature"] == pytest.approx(1.25)
    assert shifted["tie_break"] == pytest.approx(0.75)
    # sum of A * words per vote: (+7 - 2), (1 - 3), (1 - 3), (2 - 5) unshifted
    assert plain["words_push"] == pytest.approx((5 - 2 - 2 - 3) / 4)
    assert shifted["words_push"] == pytest.approx(
        (1.25 * 7 - 1.25 * 2 + 0.75 * (1 - 3) * 2 + 0.75 * (2 - 5)) / 4)
    # every vote is between two replies that end a sentence or two cut at the limit (no
    # closing punctuation): none pushes toward or away from finishing; a vote the reply that
    # ends wins pushes toward it
    assert plain["finish_push"] == pytest.approx(0.0)
    ends = weigh("you", [("It ends here.", "It does not end and")], 0.0)
    assert ends["finish_push"] == pytest.approx(1.0) and ends["feature"] is None
    # measured as the policy can shorten a reply, two cut ones are equally long: that vote
    # is left unshifted, and the rate counts the 3 votes between replies of other lengths
    real = weigh("you", pairs, 1.0, measure="real")
    assert real["shorter_wins"] == pytest.approx((2 + 2) / (3 + 4))
    taste = 2 * 4 / 7 - 1
    assert real["tie_break"] == pytest.approx((2 * (1 - taste) + 1.0) / 3)
    assert len(within_prompt_pairs(texts, 4)) == 2 * 6
    with pytest.raises(ValueError, match="do not split into prompts of 3"):
        within_prompt_pairs(texts, 3)


def test_length_shift_runs_on_texts(tmp_path):
    kept = tmp_path / "before.json"
    kept.write_text(json.dumps({"texts": ["Short one.", "A longer reply for you.",
                                          "Tiny.", "A longer reply."]}))
    bench(["length-shift", "--user", "you", "--user", "noisy-numbers", "--texts", str(kept),
           "--per-prompt", "2", "--strength", "0,1", "--out", str(tmp_path)])
    results = result(tmp_path, "length-shift-texts-words")
    assert set(results) == {"you", "noisy-numbers"} and set(results["you"]) == {"0.0", "1.0"}
    assert results["you"]["1.0"]["feature_votes"] == 1
    with pytest.raises(ValueError, match="give --suite NAME, or --user NAME with --texts"):
        bench(["length-shift", "--user", "you", "--out", str(tmp_path)])


def test_read_base_reads_each_seeds_replies_once_and_sets_them_beside_the_kept_ones(
        tmp_path, monkeypatch):
    import argparse

    import bench.user_suite as user_suite
    from bench.user_suite import baseline_of, sampling_form

    # one held-out prompt of the suite's 8 replies
    kept = ["The answer is simple.", "Sure, here it is.", "It is what I said.", "No."] * 2
    here = ["The answer is straightforward.", "This works for me.", "Okay.", "Fine, yes."] * 2
    reads = []

    def fake_read(**kwargs):
        reads.append(kwargs)
        return here

    monkeypatch.setattr(user_suite, "read_held_out", fake_read)
    args = argparse.Namespace(suite="unseen-reader-64-wide", out=str(tmp_path), extra=[],
                              eval_prompts=1, max_new_tokens=4, model="m", prompts=None,
                              read_base=True)
    kept_folder = tmp_path / f"api-user-suite-{baseline_of(args.suite)}"
    kept_folder.mkdir()
    (kept_folder / "before-s0.json").write_text(json.dumps({"texts": kept, "read_by": "x"}))
    folder = tmp_path / "api-user-suite-unseen-reader-64-wide"
    folder.mkdir()
    runs = {"long-word-s0-reader-every0": ("long-word", ["A comprehensive answer."] * 6
                                           + ["Short.", "Also short."]),
            "opener-s1-reader-every0": ("opener", ["It is."] * 8),
            "noisy-for-s0-reader-every0": ("noisy-for", ["Fewer replies."] * 4)}
    for stem, (user, after) in runs.items():
        (folder / f"{stem}.json").write_text(json.dumps(
            {"settings": {"user": user}, "results": {"after_texts": after}}))
    table = user_suite.run_suite(args).read_text()
    form = sampling_form([])
    assert sorted(p.name for p in folder.iterdir() if not p.stem.endswith("every0")) == sorted(
        [f"base-s0-{form}.json", f"base-s1-{form}.json", f"base-reread-{form}.md"])
    assert [r["seed"] for r in reads] == [0, 1]
    assert all("--no-learner" not in r["extra"] for r in reads)  # read_held_out adds it
    assert all(r["eval_replies"] == 8 for r in reads)  # the suite's, not the command line's
    saved = json.loads((folder / f"base-s0-{form}.json").read_text())
    assert saved["texts"] == here and saved["machine"]["cpus"]
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line
            for line in table.splitlines() if line.startswith("| 0 |")}
    # kept: "The"/"It" open 4 of 8, "I" in 2; read here: "The"/"This" open 4, "me" in 2,
    # "for" in 2, a 12-letter word ("straightforward") in 2
    assert "| 0/8 (" in rows[("0", "long-word")] and "| 2/8 (" in rows[("0", "long-word")]
    assert rows[("0", "opener")].count("4/8") == 2
    assert "0/8" in rows[("0", "noisy-for")] and "2/8" in rows[("0", "noisy-for")]
    assert "| 1 | (no kept replies before" in table  # seed 1 has none in the kept folder
    assert (kept_folder / "before-s0.json").exists() and len(list(kept_folder.iterdir())) == 1
    # each kept run judged again against the replies read here, whether or not its seed has
    # kept replies before; a run with another number of replies is left out
    judged = [line for line in table.splitlines() if "-every0 |" in line]
    assert len(judged) == 2
    assert judged[0].startswith("| long-word-s0-reader-every0 | 2/8 → 6/8 |")
    assert judged[1].startswith("| opener-s1-reader-every0 | 4/8 → 8/8 |")

    user_suite.run_suite(args)  # the replies read here are kept: nothing is read again
    assert len(reads) == 2


def test_the_defaults_suite_runs_the_product_with_no_flags_an_arm_at_a_time(
        tmp_path, monkeypatch):
    """defaults-reader gives app.py no flags (length-neutral votes are a default now) and is
    read beside corrections-neutral-reader, which gave that flag; it runs every run of its
    first arm (corrections) before any of votes only, so a suite cut short has whole arms."""
    import argparse

    import bench.user_suite as user_suite
    from bench.user_suite import SUITES, baseline_of

    suite = SUITES["defaults-reader"]
    assert suite.extra == () and suite.correct_every == (8, 0)
    assert SUITES[suite.against].extra == ("--length-neutral", "1")
    assert baseline_of("defaults-reader") == "corrections-reader"
    order, texts = [], []

    def fake_run_to_file(args, path, folder, name, oracle, text, seed, pace, every, *rest):
        order.append(path.stem)
        texts.append(text)
        path.write_text(json.dumps({
            "settings": {"user": name, "seed": seed, "pace": pace, "correct_every": every},
            "results": {"satisfied_share_before": 0.3, "satisfied_share_after": 0.5,
                        "p_value_one_sided": 0.01, "length_ratio": 0.9, "corrections": 0,
                        "round_sizes": [4], "vote_to_live_seconds_median": 30.0}}))

    monkeypatch.setattr(user_suite, "run_to_file", fake_run_to_file)
    monkeypatch.setattr(user_suite, "check_user", lambda name: (name, ("first", "second")))
    monkeypatch.setattr(user_suite, "plot", lambda runs, path: None)
    monkeypatch.setattr(user_suite, "write_result", lambda *a: tmp_path / "suite.json")
    args = argparse.Namespace(suite="defaults-reader", out=str(tmp_path), extra=[],
                              summarize=False, eval_prompts=32, max_new_tokens=48, model="m")
    user_suite.run_suite(args)
    arms = [int(name.split("every")[1]) for name in order]
    assert len(order) == 16 and arms == [8] * 8 + [0] * 8
    assert order[:2] == ["contractions-s0-reader-every8", "can-s0-reader-every8"]
    assert set(texts) == {"first"}  # the same sentence first in every rewrite

    texts.clear()
    varied = SUITES["varied-reader-64"]  # its users draw from all their sentences
    assert varied.varied and varied.against == "defaults-reader-64"
    user_suite.run_suite(argparse.Namespace(**{**vars(args), "suite": "varied-reader-64"}))
    assert texts and all(text == ["first", "second"] for text in texts)


def test_the_soak_summary_reads_growth_over_the_second_half():
    from bench.soak import slope_per_hour, summary

    assert slope_per_hour([0, 1800, 3600], [100, 150, 200]) == pytest.approx(100.0)
    assert slope_per_hour([5], [1]) is None and slope_per_hour([5, 5], [1, 2]) is None
    # warm-up growth in the first half, flat after: the headline says flat
    readings = [{"seconds": 600.0 * i, "server_rss_mb": min(900.0, 500.0 + 100 * i),
                 "learner_rss_mb": None, "db_mb": 1.0 + i} for i in range(10)]
    out = summary(readings)
    assert out["server_rss_mb"] == {
        "first": 500.0, "last": 900.0, "max": 900.0, "growth_per_hour_second_half": 0.0,
        "halves": [{"median": 700.0, "max": 900.0}, {"median": 900.0, "max": 900.0}]}
    assert out["db_mb"]["growth_per_hour_second_half"] == pytest.approx(6.0)  # 1 MB / 10 min
    assert "learner_rss_mb" not in out  # never read


@pytest.mark.slow
def test_a_short_soak_through_the_api_loses_nothing_and_keeps_folders_bounded(tiny_model_dir,
                                                                              tmp_path):
    """The soak harness on the tiny model for half a minute: chat, votes and rounds through
    /v1, a reading every 5 s."""
    import argparse

    from bench.soak import run

    path = run(argparse.Namespace(
        minutes=0.5, sample_seconds=5.0, reader_seconds=0.1, turns=3, oracle="shorter",
        max_new_tokens=8, model=str(tiny_model_dir), seed=0, out=str(tmp_path),
        extra=["--learn-every", "2", "--keep-versions", "2", "--swap-poll-seconds", "0.5"]))
    results = json.loads(path.read_text())["results"]
    assert results["errors"] == 0 and results["votes_lost"] == 0 and results["votes"] >= 10
    readings = results["readings"]
    assert len(readings) >= 5 and readings[-1]["live_version"] > 0
    assert all(r["server_threads"] > 0 for r in readings)
    assert (tmp_path / "soak.png").stat().st_size > 0
    # the rounds' versions kept, the live one and a preview at most: bounded
    assert max(r["adapter_folders"] for r in readings) <= 2 + 2
    assert all(r["server_rss_mb"] > 0 and r["server_fds"] > 0 for r in readings)
    assert results["summary"]["server_rss_mb"]["growth_per_hour_second_half"] is not None


def test_the_neighbours_bench_reads_its_settings_and_times_per_decode_step():
    from bench.neighbours import parse_env, phase, step_ms

    assert parse_env(["OMP_WAIT_POLICY=PASSIVE", "X=a=b"]) == {"OMP_WAIT_POLICY": "PASSIVE",
                                                               "X": "a=b"}
    with pytest.raises(SystemExit, match="K=V"):
        parse_env(["OMP_WAIT_POLICY"])
    # 2 s for replies of 60 and 40 tokens: 50 steps of 40 ms; a pair cut short is not faster
    assert step_ms({"seconds": 2.0, "tokens": 100}) == pytest.approx(40.0)
    pairs = [{"seconds": 2.0, "tokens": 100}, {"seconds": 1.0, "tokens": 20},
             {"seconds": 4.0, "tokens": 100}]
    out = phase(pairs, alone=40.0)
    assert out["median_step_ms"] == 80.0 and out["vs_alone"] == 2.0
    assert out["median_seconds"] == 2.0


@pytest.mark.slow
def test_two_servers_and_a_busy_neighbour_are_timed_against_one_alone(tiny_model_dir, tmp_path):
    bench(["neighbours", "--model", str(tiny_model_dir), "--pairs", "1", "--max-new-tokens",
           "4", "--env", "DUET_NEIGHBOURS_TEST=1", "--out", str(tmp_path)])
    results = result(tmp_path, "neighbours")
    settings = json.loads((tmp_path / "neighbours.json").read_text())["settings"]
    assert settings["env"] == {"DUET_NEIGHBOURS_TEST": "1"}
    for name in ("alone", "two_servers_a", "two_servers_b", "beside_busy"):
        assert len(results[name]["pairs"]) == 1 and results[name]["median_step_ms"] > 0
    assert results["worst_vs_alone"] == max(results[k]["vs_alone"] for k in (
        "two_servers_a", "two_servers_b", "beside_busy"))
    assert "DUET_NEIGHBOURS_TEST" not in os.environ  # put back as it was
