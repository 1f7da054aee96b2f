"""`python -m bench NAME [options]`: run one benchmark and write its JSON result."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from bench.common import BadRequest, remember_commit

BENCHMARKS = {
    "learn": "bench.learn",
    "pair": "bench.pair",
    "decode": "bench.decode",
    "learner": "bench.learner_round",
    "shared-prompts": "bench.shared_prompts",
    "swap": "bench.swap",
    "latency": "bench.latency",
    "api-user": "bench.api_user",
    "feature-share": "bench.feature_share",
    "length-shift": "bench.length_shift",
    "pair-choice": "bench.choice",
    "sweep": "bench.sweep",
    "store": "bench.store",
    "soak": "bench.soak",
    "neighbours": "bench.neighbours",
}


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    """The command line, and each benchmark's module by name."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    commands = parser.add_subparsers(dest="name", required=True)
    modules = {}
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=module.__doc__.strip().splitlines()[0])
        module.add_args(sub)
        modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    remember_commit()
    path = modules[args.name].run(args)
    print(f"wrote {path}")
    return 0


def cli() -> int:
    """main(), with a bad request (bench.common.BadRequest) said in one line instead of a
    traceback."""
    try:
        return main()
    except BadRequest as error:
        print(f"python -m bench: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
