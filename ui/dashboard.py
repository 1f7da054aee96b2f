"""The learning dashboard tab: live version, votes and corrections, learner state, curves,
adapter versions, what the feedback changed, and (for admins) rollback. It only reads what
the DB holds, so it works before the learner has run a single round (empty plots, no errors).

The curves are drawn on the server with matplotlib (a PNG: no script or font from elsewhere),
with a marker on every round so that a single round shows as a point, and whole rounds on the
x axis; they are redrawn only when a round was added. "What changed" is asked for with a
button, because it samples replies: for the turns whose reply the user rewrote (shown with
the rewrite), then the first messages of their latest conversations, a reply of the base
model beside one of the live adapter.

Its shape is the chat's (ui/chat.py): `build` lays the components out into a `Board`, the
handlers are functions of the board and the event's inputs returning a dict keyed by the
components they change, and `wire` binds them.

Left out: zooming and hovering on the curves (a picture, not a chart widget), comparing two
adapter versions other than the base and the live one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from chatbot.errors import InvalidInput
from chatbot.service import ChatService
from ui.common import as_markdown, bind, chatbot, reply_markdown, user_errors, user_of

REFRESH_SECONDS = 5.0
COMPARE_PROMPTS = 3


def status_markdown(status: dict) -> str:
    learner = status.get("learner") or {}
    state = learner.get("state", "unknown")
    if learner.get("exit_code") is not None:
        state += f" (exit code {learner['exit_code']})"
    lines = [
        f"**Live adapter:** v{status['live_adapter_version']}"
        + ("" if status["live_adapter_version"] else " (the base model)"),
        f"**Votes:** {status['votes_total']} total, {status['votes_pending']} waiting for the "
        f"learner; **corrections:** {status.get('corrections_total', 0)} total, "
        f"{status.get('corrections_pending', 0)} waiting; "
        f"**ratings waiting:** {status.get('ratings_pending', 0)}",
        f"**Learner:** {state}",
        f"**Model:** `{status['model']}`",
    ]
    agreement = running_agreement(status.get("steps") or [])
    if agreement is not None:
        share, pairs = agreement
        lines.append(f"**Agreement with the newest votes:** the live adapters preferred what "
                     f"the user chose in {share:.0%} of the last {pairs} voted pairs, judged "
                     "before they trained on them (a coin scores 50%)")
    if learner.get("last_error"):
        lines.append(f"**Learner's last error:** `{learner['last_error']}`")
    if status.get("swap_error"):
        lines.append(f"**Adapter not loaded:** `{status['swap_error']}`")
    if not status["live_adapter_version"] and not status.get("rounds"):
        lines.append("_No learner round yet: the curves fill in after the first "
                     "`--learn-every` votes._")
    return "\n\n".join(lines)


def running_agreement(steps: list[dict], window: int = 32) -> tuple[float, int] | None:
    """Share of the newest (about `window`) judged pairs where the adapter that was live when
    the vote came in already preferred the chosen reply; None before any were judged."""
    total, pairs = 0.0, 0
    for step in reversed(steps):
        n = step.get("judged_pairs") or 0
        if n and step.get("live_heldout_acc") is not None:
            total += step["live_heldout_acc"] * n
            pairs += n
        if pairs >= window:
            break
    return (total / pairs, pairs) if pairs else None


def curves(steps: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Long-format frames for the two plots: (reward and accuracies, KL and beta) per round."""
    quality, kl = [], []
    for i, step in enumerate(s for s in steps if s.get("status") != "failed"):
        for key, label, rows in [("reward", "user reward", quality),
                                 ("live_heldout_acc", "agreement with new votes (live)",
                                  quality),
                                 ("heldout_acc", "agreement with new votes (candidate)",
                                  quality),
                                 ("kl", "KL per token", kl), ("beta", "beta (KL coefficient)", kl)]:
            if step.get(key) is not None:
                rows.append({"round": i + 1, "value": float(step[key]), "metric": label})
    columns = ["round", "value", "metric"]
    return pd.DataFrame(quality, columns=columns), pd.DataFrame(kl, columns=columns)


def curve_figure(frame: pd.DataFrame, title: str, y_label: str,
                 y_lim: tuple[float, float] | None = None):
    """A line per metric with a marker per round; rounds are whole numbers on the x axis."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    for metric, rows in frame.groupby("metric", sort=False):
        axes.plot(rows["round"], rows["value"], marker="o", markersize=5, label=metric)
    last = int(frame["round"].max()) if len(frame) else 1
    axes.set_xlim(0.5, last + 0.5)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    axes.set_title(title, fontsize="medium", loc="left")
    axes.set_xlabel("learner round")
    axes.set_ylabel(y_label)
    if y_lim:
        axes.set_ylim(*y_lim)
    axes.grid(alpha=0.3)
    if len(frame):
        figure.legend(fontsize="small", loc="outside lower center", ncols=2, frameon=False)
    else:
        axes.text(0.5, 0.5, "no learner round yet", ha="center", va="center",
                  transform=axes.transAxes, color="gray")
    return figure


def adapters_table(rows: list[dict]) -> pd.DataFrame:
    records = []
    for row in reversed(rows):
        metrics = row.get("metrics") or {}
        acc = metrics.get("heldout_acc")
        records.append({"version": row["version"], "status": row["status"],
                        "parent": row["parent_version"],
                        "agreement": None if acc is None else round(acc, 3),
                        "KL": None if metrics.get("kl") is None else round(metrics["kl"], 4),
                        "on disk": bool(row["path"]), "created": row["created_at"][:19],
                        "why": row.get("reason") or ""})
    columns = ["version", "status", "parent", "agreement", "KL", "on disk", "created", "why"]
    return pd.DataFrame(records, columns=columns)


@dataclass
class Board:
    service: ChatService
    is_admin: Callable[[gr.Request], bool]
    status: gr.Markdown
    quality_plot: gr.Plot
    kl_plot: gr.Plot
    drawn: gr.State  # how many rounds the plots on this page show
    versions: gr.Dataframe
    compare: gr.Button
    compare_note: gr.Markdown
    slots: list[tuple[gr.Group, gr.Markdown, gr.Chatbot, gr.Chatbot]]  # one per compared turn
    admin_row: gr.Row
    target: gr.Textbox  # the version to roll back to
    rollback: gr.Button
    timer: gr.Timer

    @property
    def outputs(self) -> list:
        """What a refresh changes."""
        return [self.status, self.quality_plot, self.kl_plot, self.versions, self.drawn]

    @property
    def compare_outputs(self) -> list:
        return [self.compare_note, *(c for slot in self.slots for c in slot)]


def compare_heading(row: dict) -> str:
    """What a comparison row answers: the user's message (and how far into its conversation),
    and their rewrite of the reply when the row is a corrected turn."""
    earlier = row.get("earlier_messages") or 0
    where = f" (after {earlier} earlier message{'s' * (earlier != 1)})" if earlier else ""
    text = f"**You asked{where}:** " + as_markdown(row["prompt"])
    if row.get("correction"):
        text += "\n\n**Your rewrite of the reply:** " + as_markdown(row["correction"])
    return text


def rollback_target(text: str | None) -> int | None:
    """The version typed in the rollback box: None (empty) means the live version's parent."""
    text = (text or "").strip().removeprefix("v")
    if not text:
        return None
    if not text.isdigit():
        raise InvalidInput(f"{text!r} is not a version number: type e.g. 3, or 0 for the base "
                         "model, or leave it empty for the live version's parent")
    return int(text)


def build(service: ChatService, is_admin: Callable[[gr.Request], bool]) -> Board:
    status = gr.Markdown(elem_id="learning-status")
    with gr.Row():
        quality_plot = gr.Plot(show_label=False, format="png", elem_id="quality-plot")
        kl_plot = gr.Plot(show_label=False, format="png", elem_id="kl-plot")
    drawn = gr.State(-1)
    versions = gr.Dataframe(label="Adapter versions", interactive=False, elem_id="versions")
    gr.Markdown("### What your feedback changed\nFor the turns whose reply you rewrote, then "
                "the first messages of your latest conversations, one reply of the base model "
                "beside one of the live adapter (each a fresh sample, so they vary from one try "
                "to the next). The chat waits while the base model's replies are written.")
    compare_button = gr.Button("Compare the base model with the live adapter",
                               elem_id="compare", size="sm")
    compare_note = gr.Markdown(elem_id="compare-note")
    slots = []
    for i in range(COMPARE_PROMPTS):
        with gr.Group(visible=False, elem_id=f"compare-{i}") as group:
            prompt = gr.Markdown(padding=True)
            with gr.Row(equal_height=True):
                base = chatbot("Base model", None, 100, 400, buttons=[])
                live = chatbot("Live adapter", None, 100, 400, buttons=[])
        slots.append((group, prompt, base, live))
    with gr.Row(visible=False) as admin_row:
        target = gr.Textbox(label="Roll back to version (0 = the base model)",
                            placeholder="empty: the live version's parent",
                            elem_id="rollback-version")
        rollback_button = gr.Button("Roll back", variant="stop", elem_id="rollback")
    return Board(service=service, is_admin=is_admin, status=status, quality_plot=quality_plot,
                 kl_plot=kl_plot, drawn=drawn, versions=versions, compare=compare_button,
                 compare_note=compare_note, slots=slots, admin_row=admin_row, target=target,
                 rollback=rollback_button, timer=gr.Timer(REFRESH_SECONDS))


# --- handlers: functions of the board and the event's inputs, returning what they change ----

def refresh(board: Board, shown: int = -1) -> dict:
    """The status, the versions and (when a round was added) the curves."""
    data = board.service.dashboard()
    status = {**data["status"], "rounds": len(data["steps"]), "steps": data["steps"]}
    update = {board.status: status_markdown(status), board.drawn: len(data["steps"]),
              board.versions: adapters_table(data["adapters"])}
    if len(data["steps"]) != shown:
        quality, kl = curves(data["steps"])
        update[board.quality_plot] = curve_figure(
            quality, "Reward, and agreement with the newest votes", "share / reward",
            (-1.05, 1.05))
        update[board.kl_plot] = curve_figure(kl, "KL to the base model, and its coefficient",
                                             "per token")
    return update


def show_admin(board: Board, request: gr.Request) -> dict:
    return {board.admin_row: gr.Row(visible=board.is_admin(request))}


@user_errors
def roll_back(board: Board, version: str, request: gr.Request) -> dict:
    if not board.is_admin(request):
        raise gr.Error("only an admin can roll back")
    result = board.service.rollback(rollback_target(version))
    gr.Info(f"v{result['live_adapter_version']} is live (was v{result['previous_version']})")
    return refresh(board)


@user_errors
def compare(board: Board, request: gr.Request) -> dict:
    """One reply of the base model beside one of the live adapter, for the user's turns."""
    result = board.service.compare_with_base(user_of(request), COMPARE_PROMPTS)
    rows, version = result["rows"], result["live_adapter_version"]
    if not version:
        note = "The base model is live (no adapter yet): the votes have changed nothing."
    elif not rows:
        note = "Nothing to compare yet: start a conversation first."
    else:
        note = f"Live adapter: **v{version}**."
    update = {board.compare_note: note}
    for i, (group, prompt, base, live) in enumerate(board.slots):
        row = rows[i] if i < len(rows) else None
        update[group] = gr.Group(visible=row is not None)
        if row:
            update[prompt] = compare_heading(row)
            update[base] = [{"role": "assistant",
                             "content": reply_markdown(row["base"], row["base_cut_at"])}]
            update[live] = gr.Chatbot(label=f"Live adapter v{version}", value=[
                {"role": "assistant",
                 "content": reply_markdown(row["live"], row["live_cut_at"])}])
    return update


def wire(board: Board, tab: gr.Tab, page: gr.Blocks) -> None:
    """Bind the handlers to the board's events, its tab's selection and the page's load.
    None is part of the public API."""
    private = {"api_visibility": "private"}
    board.timer.tick(bind(refresh, board), [board.drawn], board.outputs, show_progress="hidden",
                     **private)
    tab.select(bind(refresh, board), None, board.outputs, **private)
    board.rollback.click(bind(roll_back, board), [board.target], board.outputs, **private)
    board.compare.click(bind(compare, board), None, board.compare_outputs, **private)
    page.load(bind(show_admin, board), None, [board.admin_row], **private)
