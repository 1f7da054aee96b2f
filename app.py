"""Duet: chat with two replies per turn, vote, and let the model learn from the votes.

    python app.py                        serve the chat on http://127.0.0.1:7860 (+ learner)
    python app.py export --out F.jsonl   write votes and corrections as TRL preference rows
    python app.py export --out F.jsonl --sft   ... or the corrections as TRL SFT rows
    python app.py rollback [--to N]      make an earlier adapter version live again
    python app.py keys add USER          make an API key for the OpenAI-compatible API
    python app.py users forget USER [--relearn]   delete a user's data (and what it taught)
    python app.py backup --out F.db      a copy of the database and adapters, while it serves
    python app.py restore --from F.db    ... back into this (empty) deployment
    python app.py migrate --to URL       move a SQLite deployment into PostgreSQL

argparse -> Config -> the pieces in chatbot/, ui/ and learner/. Logging is configured here.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from chatbot import heap
from chatbot.config import (
    Config,
    add_learner_args,
    add_model_args,
    add_sampling_args,
    add_server_args,
    add_storage_args,
    with_device_defaults,
)
from chatbot.errors import DuetError, InvalidInput
from chatbot.threads import CpuShare

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
    commands = parser.add_subparsers(
        dest="command", metavar="{export,rollback,keys,users,backup,restore,migrate}")
    export = commands.add_parser("export", help="write the feedback as TRL JSONL: votes and "
                                 "corrections as preference rows (or, with --sft, corrections "
                                 "as SFT rows)")
    export.add_argument("--out", required=True, help="the JSONL file to write")
    export.add_argument("--sft", action="store_true",
                        help="write one SFT row per correction instead (the conversation "
                             "up to that turn, then the rewrite: TRL's `messages` format)")
    rollback = commands.add_parser("rollback", help="make an earlier adapter version live")
    rollback.add_argument("--to", type=int, default=None,
                          help="version to make live (0 = base model; default: the live "
                               "version's parent)")
    keys = commands.add_parser("keys", help="API keys of the OpenAI-compatible API (/v1)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True,
                                       metavar="{add,list,remove}")
    key_add = key_commands.add_parser("add", help="make a key for USER and print it once")
    key_add.add_argument("user", metavar="USER", help="the login name the key stands for")
    key_commands.add_parser("list", help="list the keys (user, hint, when made)")
    key_remove = key_commands.add_parser("remove", help="delete every key of USER")
    key_remove.add_argument("user", metavar="USER", help="whose keys to delete")
    users = commands.add_parser("users", help="the users in the database; forget one")
    user_commands = users.add_subparsers(dest="users_command", required=True,
                                         metavar="{list,forget}")
    user_commands.add_parser("list", help="list the users (conversations, votes, corrections)")
    forget = user_commands.add_parser(
        "forget", aliases=["delete"],
        help="delete every conversation, vote, rating, correction and API key of USER, and "
             "name the adapter versions trained on their feedback")
    forget.add_argument("user", metavar="USER", help="the user to forget")
    forget.add_argument("--relearn", action="store_true",
                        help="also undo what the adapters learnt from them: make live the "
                             "version their feedback's first round started from, delete the "
                             "later versions, and learn the other users' feedback again")
    backup = commands.add_parser(
        "backup", help="copy the database and its adapter versions into a new SQLite file, "
                       "while the server runs (the adapters go in an adapters/ folder beside "
                       "it; serve the copy with --data-dir FOLDER)")
    backup.add_argument("--out", required=True, metavar="FILE", help="the new SQLite file")
    restore = commands.add_parser(
        "restore", help="copy a backup into this deployment's database (--data-dir or --db), "
                        "which must be empty")
    restore.add_argument("--from", dest="source", required=True, metavar="FILE",
                         help="the backup's SQLite file (its adapters/ folder beside it)")
    migrate = commands.add_parser(
        "migrate", help="copy this deployment into an empty PostgreSQL database, adapter "
                        "files included, for front-ends on several hosts")
    migrate.add_argument("--to", required=True, metavar="URL",
                         help="postgresql://USER@HOST/NAME of an empty database")
    return parser


def read_credentials(pairs: list[str] | None, path: str | None) -> list[tuple[str, str]]:
    """USER:PASSWORD entries from --auth and --auth-file, checked for shape."""
    entries = list(pairs or [])
    if path:
        try:
            lines = open(path, encoding="utf-8").read().splitlines()
        except OSError as exc:
            raise InvalidInput(f"cannot read --auth-file {path}: {exc.strerror}") from None
        entries += [line.strip() for line in lines
                    if line.strip() and not line.lstrip().startswith("#")]
    credentials = []
    for entry in entries:
        user, sep, password = entry.partition(":")
        if not sep or not user.strip() or not password:
            raise InvalidInput(f"a login must look like USER:PASSWORD, got {user.strip()!r}:...")
        credentials.append((user.strip(), password))
    return credentials


def server_share(config: Config, device) -> CpuShare | None:
    """The thread count of the server's pairs on a CPU: every core while the rest of the host
    is quiet, one while another process - its own learner child in a round included - keeps
    it busy (chatbot/threads.py); none - a fixed count - with --threads or on a GPU."""
    import torch

    from chatbot.threads import host_share

    if config.threads or device.type != "cpu":
        return None
    every_core = torch.get_num_threads()  # OMP_NUM_THREADS, if set, or every core
    log.info("torch threads: %d while the host is quiet, 1 while another process (the "
             "learner in a round too) keeps it busy (--threads N: a fixed count)", every_core)
    share = host_share(every_core, lambda: [os.getpid()])
    share.watch()  # a pair's first step judges the last half second, not the pause before it
    return share


def serve(config: Config, credentials: list[tuple[str, str]]) -> None:
    import torch

    from chatbot.hotswap import LiveAdapter
    from chatbot.learner_process import LearnerProcess, learner_state
    from chatbot.model import load_model
    from chatbot.sampling import PairGenerator
    from chatbot.service import ChatService
    from chatbot.store import Store
    from ui.app import CSS, THEME, build_ui
    from ui.common import LOCAL_USER
    from ui.openai_api import openai_routes

    if config.seed is not None:
        torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    store = Store(config.db_url)
    learner = LearnerProcess(config, store) if config.start_learner else None
    if learner:
        learner.start()  # loads its own model copy meanwhile
    # The engine: the model in this process, in llama.cpp, or on a vLLM server (only the
    # tokenizer here).
    if config.engine == "vllm":
        from chatbot import vllm_engine

        generator, live, model_id = vllm_engine.connect(config, store)
    elif config.engine == "llama-cpp":
        from chatbot import llama_engine

        generator, live, model_id = llama_engine.connect(
            config, store, cpu_share=server_share(config, torch.device("cpu")))
    else:
        loaded = load_model(config)
        live = LiveAdapter(loaded.model, loaded.model_id, store, config.adapters_dir)
        generator = PairGenerator(loaded, config, adapter_context=live.reading,
                                  base_context=live.base,
                                  cpu_share=server_share(config, loaded.device))
        model_id = loaded.model_id
    live.start(config.swap_poll_seconds)
    service = ChatService(config, store, generator, model_id=model_id, live=live,
                          learner_state=learner.state if learner else lambda: learner_state(store))
    admins = frozenset(config.admins) if credentials else frozenset({LOCAL_USER})
    demo = build_ui(service, admins=admins)
    demo.queue(default_concurrency_limit=config.concurrency, max_size=config.queue_size)
    if config.host not in ("127.0.0.1", "localhost", "::1") and not credentials:
        log.warning("listening on %s without --auth: anyone who can reach this address can "
                    "chat, vote and read every conversation of the local user", config.host)
    # The OpenAI-compatible /v1 routes join Gradio's own app: same server, same service.
    routes = openai_routes(service, logins=bool(credentials))
    try:
        demo.launch(server_name=config.host, server_port=config.port,
                    auth=credentials or None, auth_message="Duet: sign in to chat",
                    blocked_paths=[str(p) for p in (config.data_dir, config.cache_dir,
                                                    store.path and store.path.parent) if p],
                    share=config.share, theme=THEME, css=CSS, app_kwargs={"routes": routes})
    finally:
        live.stop()
        generator.close()
        if learner:
            learner.stop()


def export(config: Config, out: str, sft: bool) -> None:
    from chatbot.export import export_preferences, export_sft
    from chatbot.store import Store

    store = Store(config.db_url)
    if sft:
        print(f"wrote {export_sft(store, out)} SFT rows (one per correction) to {out}")
        return
    counts = export_preferences(store, out)
    print(f"wrote {sum(counts.values())} preference pairs to {out} ({counts['votes']} from "
          f"votes, {counts['corrections']} from corrections)")


def rollback(config: Config, to: int | None) -> None:
    from chatbot.service import rollback as make_live
    from chatbot.store import Store

    result = make_live(Store(config.db_url), config, to)
    print(f"v{result['live_adapter_version']} is live (was v{result['previous_version']}); "
          "a running server switches to it within a few seconds")


def keys(config: Config, args: argparse.Namespace) -> None:
    from chatbot import api_keys
    from chatbot.store import Store

    store = Store(config.db_url)
    if args.keys_command == "add":
        key = api_keys.add_key(store, args.user)
        print(f"API key for {args.user.strip()} (shown only now; only its hash is stored):")
        print(key)
    elif args.keys_command == "list":
        rows = store.api_keys()
        for row in rows:
            print(f"{row['user_id']}\t{row['hint']}\t{row['created_at']}")
        if not rows:
            print("no API keys")
    else:
        print(f"removed {store.remove_api_keys(args.user)} key(s) of {args.user}")


def users(config: Config, args: argparse.Namespace) -> None:
    from chatbot.service import forget_user
    from chatbot.store import Store

    store = Store(config.db_url)
    if args.users_command == "list":
        rows = store.users()
        for row in rows:
            print(f"{row['id']}\t{row['conversations']} conversations\t{row['votes']} votes\t"
                  f"{row['corrections']} corrections")
        if not rows:
            print("no users")
        return
    result = forget_user(store, config, args.user, relearn=args.relearn)
    deleted = ", ".join(f"{n} {table.replace('_', ' ')}"
                        for table, n in result["deleted"].items() if n)
    print(f"forgot {args.user}: {deleted or 'nothing but the name'}")
    trained = result["trained_on"]
    if not trained:
        print("no adapter version was trained on their feedback")
    elif args.relearn:
        print(f"v{result['live_adapter_version']} is live, the version before the first round "
              f"that used their feedback; {len(result['removed'])} later version folder(s) "
              "deleted; the other users' feedback those versions used will be learnt again")
    else:
        print("adapter versions trained on their feedback (their weights keep what it "
              f"taught): {', '.join(f'v{v}' for v in trained)}; run again with --relearn "
              "to undo that as well")


def copy(config: Config, args: argparse.Namespace) -> None:
    """backup, restore and migrate: one copy (chatbot/backup.py) in three directions."""
    from chatbot.backup import copy_deployment
    from chatbot.db import is_postgres_url
    from chatbot.store import Store

    if args.command == "restore":
        source = Path(args.source).expanduser()
        if not source.is_file():
            raise InvalidInput(f"no backup at {source}")
        result = copy_deployment(Store(source), source.parent / "adapters", config.db_url,
                                 config.adapters_dir, new_file=False)
        target = config.db_url
    else:
        target = args.out if args.command == "backup" else args.to
        if (args.command == "migrate") != is_postgres_url(target):
            raise InvalidInput("backup writes a SQLite file; migrate goes to a postgresql:// URL")
        result = copy_deployment(Store(config.db_url), config.adapters_dir, target)
    rows = ", ".join(f"{n} {table}" for table, n in result["rows"].items() if n)
    print(f"copied into {target}: {rows or 'no rows'} (counted again there)")
    print(f"adapter versions with their files, checked against their manifests: "
          f"{len(result['versions_with_files'])}")
    if result["versions_without_files"]:
        print("copied without files (missing, or not matching their manifest): "
              + ", ".join(f"v{v}" for v in result["versions_without_files"]))


def check_pairs(config: Config) -> None:
    """InvalidInput where the ways to make a pair do not go together."""
    if config.explore_temperature and config.pair_candidates > 2:
        raise InvalidInput("--explore-temperature and --pair-candidates above 2 do not go "
                           "together: choose one way to make a pair")
    if config.explore_temperature and config.engine == "vllm":
        raise InvalidInput("--explore-temperature needs --engine transformers: a vLLM request "
                           "draws all its replies at one temperature")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    config = Config.from_args(args)
    heap.cap_kernel_cache()  # before torch's first kernel; the learner child inherits it
    try:
        if args.command == "export":
            export(config, args.out, args.sft)
        elif args.command == "rollback":
            rollback(config, args.to)
        elif args.command == "keys":
            keys(config, args)
        elif args.command == "users":
            users(config, args)
        elif args.command in ("backup", "restore", "migrate"):
            copy(config, args)
        else:
            config = Config.from_args(with_device_defaults(args))  # the learner gets the same
            if (config.engine == "vllm") != bool(config.engine_url):
                raise InvalidInput("--engine vllm and --engine-url http://HOST:PORT go together")
            check_pairs(config)
            serve(config, read_credentials(args.auth, args.auth_file))
    except DuetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
