"""A corrupt adapter is refused before it is swapped in, the previous version keeps serving,
and the reason reaches the log, /status and the dashboard."""

from __future__ import annotations

import logging

from chatbot.service import ChatService
from tests.test_hotswap import logits, publish_random_adapter
from ui.dashboard import status_markdown


def test_reason_is_logged_and_shown(tiny_config, server_side, caplog):
    store, loaded, live, generator = server_side
    publish_random_adapter(tiny_config, store, 1, seed=1)
    live.sync()
    good = logits(loaded.model)
    folder = publish_random_adapter(tiny_config, store, 2, seed=2)
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 3])
    with caplog.at_level(logging.ERROR, logger="chatbot.hotswap"):
        assert live.sync() is False
    assert "v2 not loaded" in caplog.text and "sha256" in caplog.text
    service = ChatService(tiny_config, store, generator, model_id=loaded.model_id, live=live)
    status = service.status()
    assert status["live_adapter_version"] == 1 and status["registry_live_version"] == 2
    assert "v2 not loaded" in status["swap_error"]
    assert "Adapter not loaded" in status_markdown(status)
    assert (logits(loaded.model) == good).all()
    turn = service.ask("ann", "still serving?", "")
    assert turn["adapter_version"] == 1
