"""The learning dashboard tab: live version, votes, learner state, curves, adapter versions,
and (for admins) rollback. It only reads what the DB holds, so it works before the learner
has run a single round (empty plots, no errors).
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd

from chatbot.errors import InvalidInput
from chatbot.service import ChatService
from ui.common import user_errors

REFRESH_SECONDS = 5.0


def status_markdown(status: dict) -> str:
    learner = status.get("learner") or {}
    state = learner.get("state", "unknown")
    if learner.get("exit_code") is not None:
        state += f" (exit code {learner['exit_code']})"
    lines = [
        f"**Live adapter:** v{status['live_adapter_version']}"
        + ("" if status["live_adapter_version"] else " (the base model)"),
        f"**Votes:** {status['votes_total']} total, {status['votes_pending']} waiting for the "
        f"learner; **ratings waiting:** {status.get('ratings_pending', 0)}",
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
                                 ("kl", "KL per token", kl), ("beta", "beta", kl)]:
            if step.get(key) is not None:
                rows.append({"round": i + 1, "value": float(step[key]), "metric": label})
    columns = ["round", "value", "metric"]
    return pd.DataFrame(quality, columns=columns), pd.DataFrame(kl, columns=columns)


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
class Dashboard:
    refresh: object
    outputs: list
    show_admin: object
    admin_outputs: list


def rollback_target(text: str | None) -> int | None:
    """The version typed in the rollback box: None (empty) means the live version's parent."""
    text = (text or "").strip().removeprefix("v")
    if not text:
        return None
    if not text.isdigit():
        raise InvalidInput(f"{text!r} is not a version number: type e.g. 3, or 0 for the base "
                         "model, or leave it empty for the live version's parent")
    return int(text)


def build(service: ChatService, is_admin) -> Dashboard:
    status = gr.Markdown(elem_id="learning-status")
    with gr.Row():
        quality_plot = gr.LinePlot(x="round", y="value", color="metric", y_lim=[-1, 1],
                                   label="Reward, and agreement with the newest votes",
                                   elem_id="quality-plot")
        kl_plot = gr.LinePlot(x="round", y="value", color="metric", label="KL to the base",
                              elem_id="kl-plot")
    versions = gr.Dataframe(label="Adapter versions", interactive=False, elem_id="versions")
    with gr.Row(visible=False) as admin_row:
        target = gr.Textbox(label="Roll back to version (0 = the base model)",
                            placeholder="empty: the live version's parent",
                            elem_id="rollback-version")
        rollback_button = gr.Button("Roll back", variant="stop", elem_id="rollback")
    timer = gr.Timer(REFRESH_SECONDS)

    def refresh():
        data = service.dashboard()
        quality, kl = curves(data["steps"])
        status = {**data["status"], "rounds": len(data["steps"]), "steps": data["steps"]}
        return status_markdown(status), quality, kl, adapters_table(data["adapters"])

    def show_admin(request: gr.Request):
        return gr.Row(visible=is_admin(request))

    @user_errors
    def rollback(version, request: gr.Request):
        if not is_admin(request):
            raise gr.Error("only an admin can roll back")
        result = service.rollback(rollback_target(version))
        gr.Info(f"v{result['live_adapter_version']} is live (was v{result['previous_version']})")
        return refresh()

    outputs = [status, quality_plot, kl_plot, versions]
    timer.tick(refresh, None, outputs, api_visibility="private", show_progress="hidden")
    rollback_button.click(rollback, [target], outputs, api_visibility="private")
    return Dashboard(refresh=refresh, outputs=outputs, show_admin=show_admin,
                     admin_outputs=[admin_row])
