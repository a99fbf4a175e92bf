"""Job states and the transition table of PROTOCOL §2; stdlib only."""

from __future__ import annotations

import enum

from worker.errors import IllegalTransition


class JobState(enum.StrEnum):
    """Where a job is in its life; the last four are terminal."""

    PENDING = "pending"
    QUEUED = "queued"
    ASSIGNED = "assigned"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True for a state that never changes again."""
        return self in TERMINAL


TERMINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.TIMEOUT, JobState.CANCELLED})

#: Every allowed move. `running -> queued` is a retry or a recovery (attempt + 1).
TRANSITIONS: frozenset[tuple[JobState, JobState]] = frozenset(
    {
        (JobState.PENDING, JobState.QUEUED),
        (JobState.PENDING, JobState.FAILED),  # invalid document
        (JobState.PENDING, JobState.CANCELLED),
        (JobState.QUEUED, JobState.ASSIGNED),
        (JobState.QUEUED, JobState.CANCELLED),
        (JobState.QUEUED, JobState.FAILED),
        (JobState.QUEUED, JobState.COMPLETED),  # idempotent replay of an earlier job's result
        (JobState.ASSIGNED, JobState.RUNNING),
        (JobState.ASSIGNED, JobState.CANCELLED),
        (JobState.ASSIGNED, JobState.FAILED),
        (JobState.ASSIGNED, JobState.QUEUED),  # crashed before the child started: recovery
        (JobState.RUNNING, JobState.COMPLETED),
        (JobState.RUNNING, JobState.FAILED),
        (JobState.RUNNING, JobState.TIMEOUT),
        (JobState.RUNNING, JobState.CANCELLED),
        (JobState.RUNNING, JobState.QUEUED),  # retry or recovery
    }
)


def advance(current: JobState, new: JobState) -> JobState:
    """Return `new` when the protocol allows `current -> new`; raise IllegalTransition otherwise."""
    if (current, new) not in TRANSITIONS:
        raise IllegalTransition(f"a job cannot move from {current.value} to {new.value}")
    return new
