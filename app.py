"""Duet: chat with two replies per turn, vote, and let the model learn from the votes.

    python app.py                        serve the chat on http://127.0.0.1:7860 (+ learner)
    python app.py export --out F.jsonl   write the voted pairs in TRL's preference format
    python app.py rollback [--to N]      make an earlier adapter version live again

argparse -> Config -> the pieces in chatbot/, ui/ and learner/. Logging is configured here.
"""

from __future__ import annotations

import argparse
import logging
import sys

from chatbot.config import (
    Config,
    add_learner_args,
    add_model_args,
    add_sampling_args,
    add_server_args,
    add_storage_args,
)
from chatbot.errors import DuetError

log = logging.getLogger("duet")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python app.py",
        description="Duet: a chatbot that samples two replies per turn and learns from votes.")
    add_storage_args(parser)
    add_model_args(parser)
    add_sampling_args(parser)
    add_server_args(parser)
    add_learner_args(parser)
    commands = parser.add_subparsers(dest="command", metavar="{export,rollback}")
    export = commands.add_parser("export", help="write the voted pairs as TRL preference JSONL")
    export.add_argument("--out", required=True, help="the JSONL file to write")
    rollback = commands.add_parser("rollback", help="make an earlier adapter version live")
    rollback.add_argument("--to", type=int, default=None,
                          help="version to make live (0 = base model; default: the live "
                               "version's parent)")
    return parser


def serve(config: Config) -> None:
    import torch

    from chatbot.hotswap import LiveAdapter
    from chatbot.learner_process import LearnerProcess
    from chatbot.model import load_model
    from chatbot.sampling import PairGenerator
    from chatbot.service import ChatService
    from chatbot.store import Store
    from ui.app import build_ui

    if config.seed is not None:
        torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    store = Store(config.db_path)
    learner = LearnerProcess(config, store) if config.start_learner else None
    if learner:
        learner.start()  # loads its own model copy meanwhile
    loaded = load_model(config)
    live = LiveAdapter(loaded.model, loaded.model_id, store, config.adapters_dir)
    live.start(config.swap_poll_seconds)
    generator = PairGenerator(loaded, config, adapter_context=live.reading)
    service = ChatService(config, store, generator, model_id=loaded.model_id, live=live,
                          learner_state=learner.state if learner else None)
    demo = build_ui(service)
    demo.queue(default_concurrency_limit=config.concurrency, max_size=config.queue_size)
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this address can chat and vote",
                    config.host)
    try:
        demo.launch(server_name=config.host, server_port=config.port,
                    blocked_paths=[str(config.data_dir.resolve())], share=False)
    finally:
        live.stop()
        if learner:
            learner.stop()


def export(config: Config, out: str) -> None:
    from chatbot.export import export_preferences
    from chatbot.store import Store

    count = export_preferences(Store(config.db_path), out)
    print(f"wrote {count} preference pairs to {out}")


def rollback(config: Config, to: int | None) -> None:
    from chatbot import adapters
    from chatbot.errors import Conflict, NotFound
    from chatbot.store import Store

    store = Store(config.db_path)
    live = store.live_adapter()
    if to is None:
        if live is None:
            raise Conflict("the base model (v0) is live; there is nothing to roll back")
        to = live["parent_version"] or 0
    if to:
        row = store.adapter(to)
        if row is None:
            raise NotFound(f"no adapter version {to}")
        if not row["path"]:
            raise Conflict(f"v{to} was deleted from disk (only the last {config.keep_versions} "
                           "versions are kept)")
        adapters.read_verified(config.adapters_dir / row["path"], base_model=row["base_model"],
                               manifest_sha256=row["sha256"])
    store.set_live(to)
    print(f"v{to} is live (was v{live['version'] if live else 0}); the server switches to it "
          "within a few seconds")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    config = Config.from_args(args)
    try:
        if args.command == "export":
            export(config, args.out)
        elif args.command == "rollback":
            rollback(config, args.to)
        else:
            serve(config)
    except DuetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
