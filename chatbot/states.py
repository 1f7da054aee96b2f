"""The status words Duet stores and shows, one enum per thing that has a status.

Each member's value is the word the database holds and the API and dashboard show, so rows
written before these enums read the same. StrEnum members are plain strings to SQLite,
psycopg and JSON.

Left out: a pair's status (open / voted / single), which only the store sets and reads.
"""

from __future__ import annotations

from enum import StrEnum


class LearnerState(StrEnum):
    """What the learner process says it is doing (learner_status.state)."""

    STARTING = "starting"
    IDLE = "idle"
    PREPARING = "preparing"  # between rounds: starting on the next one (learner/worker.prepare)
    TRAINING = "training"
    STOPPED = "stopped"


class AdapterStatus(StrEnum):
    """An adapter version in the registry (adapters.status)."""

    LIVE = "live"  # the one the servers serve
    REJECTED = "rejected"  # published, stopped by the gate
    RETIRED = "retired"  # was live, replaced by a newer version or a rollback


class RoundOutcome(StrEnum):
    """What a learner round did with its candidate (learner_steps.status)."""

    PROMOTED = "promoted"
    REJECTED = "rejected"
