"""The exception tree, the result error codes and the child's exit codes."""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.StrEnum):
    """The `error.code` values of a result document (PROTOCOL §3)."""

    VALIDATION_ERROR = "VALIDATION_ERROR"
    UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
    UNSUPPORTED_OPERATION = "UNSUPPORTED_OPERATION"
    CONSTRAINTS_UNSATISFIED = "CONSTRAINTS_UNSATISFIED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    EXECUTION_ERROR = "EXECUTION_ERROR"
    TIMEOUT = "TIMEOUT"
    CPU_LIMIT = "CPU_LIMIT"
    MEMORY_LIMIT = "MEMORY_LIMIT"
    KILLED = "KILLED"
    CANCELLED = "CANCELLED"
    WORKER_LOST = "WORKER_LOST"
    INTERNAL = "INTERNAL"


class ExitCode(enum.IntEnum):
    """How a job child tells the supervisor its fate when no message made it through."""

    OK = 0
    HANDLER_FAILED = 70  #: the handler raised; an `error` frame says why
    MEMORY = 71  #: the handler ran out of memory (MemoryError under RLIMIT_AS)
    SANDBOX = 72  #: the sandbox could not be entered; nothing of the job ran
    INTERNAL = 73  #: the child itself failed outside the handler


class WorkerError(Exception):
    """Base of every error the worker raises on purpose."""


class ConfigError(WorkerError):
    """Raised when a setting is missing or has a value of the wrong kind."""


class SpoolLocked(WorkerError):
    """Raised when another supervisor already holds the spool's lock."""


class JobRejected(WorkerError):
    """Raised when a job document cannot be accepted; the message names the job and the field."""

    def __init__(self, code: ErrorCode, message: str, job_id: str | None = None,
                 observability: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.job_id = job_id
        self.observability = observability  # the document's own, when valid: for its result


class IllegalTransition(WorkerError):
    """Raised when a job is asked to move between two states the protocol does not connect."""


class HandlerError(WorkerError):
    """Raised by a handler for a failure that another attempt would not fix."""

    retryable = False


class RetryableError(HandlerError):
    """Raised by a handler for a transient failure: the job is retried while attempts remain."""

    retryable = True


class UnsafeFile(WorkerError):
    """Raised when a spool file is not a regular file, is too large, or cannot be read safely."""
