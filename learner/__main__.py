"""`python -m learner`: run the learner on a database, forever or for one round (--once).

Only one learner may run per database (`Store.take_learner_lock`: a file lock beside a SQLite
file, an advisory lock on PostgreSQL). On start it gives back claims a killed learner left
behind, withdraws the preview of a round it died in (learner/rounds.py), and deletes adapter
folders the registry does not know (a crash between writing a folder and registering it); on
SIGTERM it deletes them on its way out too. Its
adapters folder is its own (--data-dir); with PostgreSQL the files it publishes also go into
the database, for front-ends on other hosts.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from chatbot import adapters, heap
from chatbot.config import Config, learner_parser, with_device_defaults
from chatbot.errors import DuetError
from chatbot.states import LearnerState

log = logging.getLogger("learner")


def _stop(*_) -> None:
    """First SIGTERM: unwind (claims go back). A second one while unwinding: die at once."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise SystemExit(143)


def remove_stale_folders(store, config: Config) -> list:
    """Delete the adapter folders the registry does not know (or no longer knows): a stop
    between writing a folder and registering it, or between unregistering and deleting one."""
    registered = {a["version"] for a in store.adapters() if a["path"]}
    return adapters.remove_stale(config.adapters_dir, registered)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    heap.cap_kernel_cache()  # before torch's first kernel (chatbot/heap.py)
    args = with_device_defaults(learner_parser().parse_args(argv))  # the server passes its own
    config = Config.from_args(args)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    from chatbot.store import Store

    store = Store(config.db_url)
    if not store.take_learner_lock():
        print("error: another learner is already running on this database", file=sys.stderr)
        return 2
    # SIGTERM ends the process through SystemExit, so a round in progress gives its claims back.
    signal.signal(signal.SIGTERM, _stop)
    pid = os.getpid()
    store.set_learner_status(pid, LearnerState.STARTING)
    try:
        import torch

        from chatbot.model import load_model
        from learner.worker import Learner

        if config.threads:
            torch.set_num_threads(config.threads)
        if config.seed is not None:  # the replies it samples itself, and its replay draws
            torch.manual_seed(config.seed)
        released = store.release_claims()
        withdrawn = store.withdraw_unfinished_preview()
        removed = remove_stale_folders(store, config)
        if released or removed or withdrawn:
            log.info("recovered: %d claims released, %d stale folders removed%s", released,
                     len(removed), f", the preview v{withdrawn} of an unfinished round "
                     "withdrawn" if withdrawn else "")
        learner = Learner(config, store, load_model(config, training=True),
                          seed=config.seed)
        if args.share_cpu_with:
            from learner.cores import learner_share

            share = learner_share(args.share_cpu_with,
                                  config.threads or torch.get_num_threads(), args.idle_threads)
            learner.clock.pace = share.apply
            log.info("sharing the CPU with pid %d and the rest of the host: %d threads while "
                     "they work, %d while they are idle", args.share_cpu_with,
                     share.busy_threads, share.idle_threads)
        if args.once:
            step = learner.round()
            print("nothing pending" if step is None else
                  f"v{step['adapter_version']} {step['status']}: {step['note']}")
        else:
            learner.run_forever()
    except DuetError as exc:
        store.set_learner_status(pid, LearnerState.STOPPED, last_error=str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        store.set_learner_status(pid, LearnerState.STOPPED)
        return 130
    except SystemExit as exc:  # SIGTERM: 143, as a process killed by it reports
        store.set_learner_status(pid, LearnerState.STOPPED)
        try:  # a folder the stop caught between two writes (the next start would do it too)
            remove_stale_folders(store, config)
        except Exception as tidy:  # noqa: BLE001 - stopping anyway; say why it was left
            log.warning("stale adapter folders left for the next start: %s", tidy)
        return exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:
        store.set_learner_status(pid, LearnerState.STOPPED,
                                 last_error=f"{type(exc).__name__}: {exc}")
        raise
    store.set_learner_status(pid, LearnerState.STOPPED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
