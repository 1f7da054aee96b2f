"""Hot-swap in the server: verified loads only, in-flight pairs keep their version, memory
stays bounded, a broken or half-written adapter is never served."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from chatbot import adapters
from chatbot.hotswap import LiveAdapter, RWLock
from chatbot.model import load_model
from chatbot.sampling import PairGenerator
from chatbot.service import ChatService
from chatbot.store import Store

MESSAGES = [{"role": "user", "content": "Hello!"}]


def publish_random_adapter(config, store, version: int, seed: int, status: str = "live",
                           rank: int = 4):
    """Publish a LoRA adapter with random weights as version `version` and register it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = load_model(config)
    peft_model = get_peft_model(base.model, LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False))
    folder, sha = adapters.publish(config.adapters_dir, version, peft_model.save_pretrained,
                                   base_model=base.model_id, parent_version=version - 1,
                                   metrics={})
    store.finish_round(f"round-{version}", {
        "version": version, "path": folder.name, "parent_version": store.live_adapter_version(),
        "base_model": base.model_id, "sha256": sha, "status": status}, {"status": status})
    return folder


def wired(config):
    """A fresh model of the config with a LiveAdapter and a PairGenerator wired like app.py
    does: (store, loaded, live, generator)."""
    store = Store(config.db_path)
    loaded = load_model(config)
    live = LiveAdapter(loaded.model, loaded.model_id, store, config.adapters_dir)
    generator = PairGenerator(loaded, config, adapter_context=live.reading,
                              base_context=live.base)
    return store, loaded, live, generator


@pytest.fixture
def server_side(tiny_config):
    """A fresh tiny model with a LiveAdapter and a PairGenerator wired like app.py does."""
    return wired(tiny_config)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 13]])).logits


def test_swap_follows_the_registry_and_unloads_the_previous_version(tiny_config, server_side):
    store, loaded, live, _ = server_side
    base = logits(loaded.model)
    publish_random_adapter(tiny_config, store, 1, seed=1)
    assert live.sync() is True and live.version == 1
    v1 = logits(loaded.model)
    assert not torch.allclose(v1, base)
    publish_random_adapter(tiny_config, store, 2, seed=2)
    live.sync()
    assert live.version == 2
    assert len(loaded.model.peft_config) == 1  # one resident slot: v2 was copied over v1
    assert not torch.allclose(logits(loaded.model), v1)
    store.set_live(1)  # rollback
    live.sync()
    assert torch.allclose(logits(loaded.model), v1, atol=1e-6)
    store.set_live(0)
    live.sync()
    assert live.version == 0 and torch.allclose(logits(loaded.model), base, atol=1e-6)
    assert live.sync() is False  # nothing to do


def test_a_swap_of_the_same_shape_copies_into_the_resident_slot(tiny_config, server_side):
    """After the first load, a version of the same shape is a copy into the same tensors;
    another rank rebuilds the slot, and serves exactly what a fresh load would."""
    store, loaded, live, _ = server_side
    publish_random_adapter(tiny_config, store, 1, seed=1)
    live.sync()
    slot = {n: p.data_ptr() for n, p in loaded.model.named_parameters() if "lora_" in n}
    assert slot
    publish_random_adapter(tiny_config, store, 2, seed=2)
    live.sync()
    assert {n: p.data_ptr() for n, p in loaded.model.named_parameters() if "lora_" in n} == slot
    assert live.last_blocking_ms is not None and live.last_blocking_ms >= 0
    copied = logits(loaded.model)
    fresh = load_model(tiny_config)
    fresh_live = LiveAdapter(fresh.model, fresh.model_id, store, tiny_config.adapters_dir)
    fresh_live.sync()  # v2 loaded from scratch into another copy of the base model
    assert torch.allclose(copied, logits(fresh.model), atol=1e-6)
    publish_random_adapter(tiny_config, store, 3, seed=3, rank=8)
    assert live.sync() and live.version == 3
    assert {n for n, p in loaded.model.named_parameters() if "lora_" in n} != set(slot)
    assert len(loaded.model.peft_config) == 1
    fresh_live.sync()
    assert torch.allclose(logits(loaded.model), logits(fresh.model), atol=1e-6)


def test_a_swap_loads_in_a_thread_of_its_own_on_a_cpu_and_in_the_pollers_on_a_gpu(
        tiny_config, server_side, monkeypatch):
    """On a CPU the version loads in a fresh thread, which takes its OpenMP team with it; on a
    GPU in the calling thread (the server's one poller), as a new thread per use of CUDA kept
    host memory."""
    store, _, live, _ = server_side
    threads = []
    load = live._load
    monkeypatch.setattr(live, "_load", lambda row: (threads.append(threading.current_thread()),
                                                    load(row))[1])
    publish_random_adapter(tiny_config, store, 1, seed=1)
    assert live.sync() and threads[-1] is not threading.current_thread()
    assert threads[-1].name == "adapter-swap"
    monkeypatch.setattr(live, "_device_type", lambda: "cuda")
    publish_random_adapter(tiny_config, store, 2, seed=2)
    assert live.sync() and live.version == 2 and threads[-1] is threading.current_thread()


def test_many_swaps_keep_one_adapter_in_memory(tiny_config, server_side):
    store, loaded, live, _ = server_side
    publish_random_adapter(tiny_config, store, 1, seed=1)
    publish_random_adapter(tiny_config, store, 2, seed=2, status="rejected")
    params = None
    for i in range(30):
        store.set_live(1 + i % 2)
        assert live.sync()
        count = sum(p.numel() for p in loaded.model.parameters())
        params = params or count
        assert count == params
        assert len(loaded.model.peft_config) == 1
    assert live.swaps == 30


@pytest.mark.parametrize("damage", ["truncate", "zero", "flip", "no_manifest", "missing_weights",
                                    "wrong_rank", "half_written"])
def test_damaged_adapter_is_never_loaded(tiny_config, server_side, damage):
    store, loaded, live, _ = server_side
    publish_random_adapter(tiny_config, store, 1, seed=1)
    live.sync()
    v1 = logits(loaded.model)
    folder = publish_random_adapter(tiny_config, store, 2, seed=2)
    weights = folder / adapters.WEIGHTS
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "zero":
        weights.write_bytes(bytes(len(data)))
    elif damage == "flip":
        weights.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])
    elif damage == "no_manifest":
        (folder / adapters.MANIFEST).unlink()
    elif damage == "missing_weights":
        weights.unlink()
    elif damage == "wrong_rank":
        config_path = folder / adapters.CONFIG
        import json

        settings = json.loads(config_path.read_text())
        settings["r"] = 16
        config_path.write_text(json.dumps(settings))
    elif damage == "half_written":  # the kill came before the rename: only a temp folder
        import shutil

        shutil.move(folder, folder.parent / ".tmp-v2-killed")
    assert live.sync() is False
    assert live.version == 1
    assert "v2 not loaded" in live.last_error
    assert torch.allclose(logits(loaded.model), v1)


def test_wrong_rank_is_caught_even_with_a_consistent_manifest(tiny_config, server_side):
    """A config that does not match the weights, re-hashed so only the shapes tell."""
    import json

    store, loaded, live, _ = server_side
    folder = publish_random_adapter(tiny_config, store, 1, seed=1)
    settings = json.loads((folder / adapters.CONFIG).read_text())
    settings["r"] = 2
    (folder / adapters.CONFIG).write_text(json.dumps(settings))
    manifest = json.loads((folder / adapters.MANIFEST).read_text())
    manifest["files"][adapters.CONFIG] = adapters.sha256_bytes((folder / adapters.CONFIG)
                                                               .read_bytes())
    raw = json.dumps(manifest).encode()
    (folder / adapters.MANIFEST).write_bytes(raw)
    store.db.execute("update adapters set sha256 = ? where version = 1",
                     (adapters.sha256_bytes(raw),))
    assert live.sync() is False
    assert "rank 2" in live.last_error and live.version == 0


def test_in_flight_pairs_finish_on_their_version_under_swaps(tiny_config, server_side):
    """Chat in threads while versions are published; every stored reply's behaviour log-prob
    matches a fresh forward pass under the version it names, so that version made it."""
    from peft import PeftModel

    store, loaded, live, generator = server_side
    config = dataclasses.replace(tiny_config, max_new_tokens=12)
    generator.config = config
    service = ChatService(config, store, generator, model_id=loaded.model_id, live=live)
    errors, pair_ids = [], []
    stop = threading.Event()

    def chat(user):
        while not stop.is_set():
            try:
                pair_ids.append(service.ask(user, "Hello!", "")["pair_id"])
            except Exception as exc:  # noqa: BLE001 - collected and asserted on
                errors.append(exc)

    threads = [threading.Thread(target=chat, args=(f"user{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for version in (1, 2, 3):
        publish_random_adapter(tiny_config, store, version, seed=version)
        live.sync()
        while len(pair_ids) < 4 * version:
            threading.Event().wait(0.05)
    stop.set()
    for thread in threads:
        thread.join()
    assert errors == []
    versions = {}
    for pair_id in pair_ids:
        versions.setdefault(store.pair(None, pair_id)["adapter_version"], []).append(pair_id)
    assert {1, 2, 3} <= set(versions)
    for version, ids in versions.items():
        model = load_model(tiny_config).model
        if version:
            model = PeftModel.from_pretrained(model, tiny_config.adapters_dir / f"v{version}")
        for pair_id in ids[:3]:
            pair = store.pair(None, pair_id)
            for reply in pair["replies"]:
                ids_ = torch.tensor([pair["prompt_token_ids"] + reply["token_ids"]])
                with torch.no_grad():
                    out = model(ids_).logits[0, len(pair["prompt_token_ids"]) - 1:-1]
                fresh = torch.log_softmax(out, -1).gather(
                    -1, torch.tensor(reply["token_ids"])[:, None]).sum().item()
                assert reply["behaviour_logprob"] == pytest.approx(fresh, abs=1e-3)
                assert reply["adapter_version"] == version


def test_rwlock_writer_waits_for_readers_and_blocks_new_ones():
    lock = RWLock()
    order = []
    reader_in = threading.Event()
    release_reader = threading.Event()

    def reader(name, hold=None):
        with lock.read():
            order.append(f"{name} in")
            reader_in.set()
            if hold:
                hold.wait(5)
        order.append(f"{name} out")

    def writer():
        with lock.write():
            order.append("writer")

    first = threading.Thread(target=reader, args=("r1", release_reader))
    first.start()
    reader_in.wait(5)
    w = threading.Thread(target=writer)
    w.start()
    threading.Event().wait(0.1)
    late = threading.Thread(target=reader, args=("r2",))
    late.start()
    threading.Event().wait(0.1)
    assert order == ["r1 in"]  # the writer waits; the late reader waits behind it
    release_reader.set()
    for t in (first, w, late):
        t.join(5)
    assert order == ["r1 in", "r1 out", "writer", "r2 in", "r2 out"]


def test_base_replies_come_from_the_base_model_while_readers_wait(tiny_config, server_side):
    """`base()` switches the adapter off for the base model's replies (the "what changed"
    view), holds every other reply back meanwhile, and leaves the live version serving."""
    store, loaded, live, generator = server_side
    base = logits(loaded.model)
    publish_random_adapter(tiny_config, store, 1, seed=1)
    live.sync()
    v1 = logits(loaded.model)
    started = threading.Event()

    def read() -> None:
        with live.reading():
            started.set()

    with live.base() as version:
        assert version == 0 and torch.allclose(logits(loaded.model), base, atol=1e-6)
        reader = threading.Thread(target=read)
        reader.start()
        assert not started.wait(0.3)  # a reply cannot start on the switched-off model
    reader.join(5)
    assert started.is_set() and torch.allclose(logits(loaded.model), v1, atol=1e-6)

    def logprobs_of(pair) -> torch.Tensor:  # each reply token's log-prob under the model now
        reply = pair.replies[0]
        ids = torch.tensor([pair.prompt_token_ids + reply.token_ids])
        with torch.no_grad():
            out = torch.log_softmax(loaded.model(ids).logits[0].float(), -1)
        n = len(pair.prompt_token_ids)
        return out[n - 1:-1].gather(-1, ids[0, n:, None])[:, 0]

    [from_base] = generator.sample_many([MESSAGES], n=1, base=True)
    [from_live] = generator.sample_many([MESSAGES], n=1)
    assert (from_base.adapter_version, from_live.adapter_version) == (0, 1)
    assert len(from_base.replies) == 1
    assert torch.allclose(logprobs_of(from_live), torch.tensor(from_live.replies[0].token_logprobs),
                          atol=1e-4)
    assert not torch.allclose(logprobs_of(from_base),
                              torch.tensor(from_base.replies[0].token_logprobs), atol=1e-4)
    with live.base():
        assert torch.allclose(logprobs_of(from_base),
                              torch.tensor(from_base.replies[0].token_logprobs), atol=1e-4)
