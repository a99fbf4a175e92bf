"""What runs after fork: enter the sandbox, run the handler, report over the pipe, `os._exit`."""

from __future__ import annotations

import encodings.idna  # noqa: F401 - lazy imports fail once the job runs as another user
import logging
import os
import socket  # noqa: F401 - ditto
import subprocess  # noqa: F401 - ditto
import sys
import traceback
from dataclasses import dataclass
from typing import Any, NoReturn

from handlers.base import Context, Handler, HandlerResult
from worker import sandbox, signals
from worker.errors import ErrorCode, ExitCode, HandlerError
from worker.progress import MessageTooLarge, MessageWriter


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """Everything a job child needs, decided by the supervisor before fork."""

    job_id: str
    operation: str
    attempt: int
    data: Any
    handler: Handler
    plan: sandbox.Plan
    message_cap: int


def run_child(spec: ChildSpec, pipe_fd: int) -> NoReturn:
    """Run one job in this freshly forked process; never returns."""
    code = ExitCode.SANDBOX
    try:
        signals.reset_in_child()
        layers = sandbox.enter_privileged(spec.plan)
        if spec.plan.pid_ns:
            init = sandbox.split_pid_namespace()
            if init:
                os.close(pipe_fd)
                sandbox.relay(init)
            layers.append("pid-namespace")
        pipe_fd, more = sandbox.enter(spec.plan, pipe_fd)
        _reset_logging()
        writer = MessageWriter(pipe_fd, spec.message_cap)
        code = _run_handler(spec, writer, layers + more)
    except BaseException:  # the sandbox failed: nothing of the job ran
        _print_exc()
    finally:
        os._exit(code)


def _run_handler(spec: ChildSpec, writer: MessageWriter, layers: list[str]) -> ExitCode:
    plan = spec.plan
    ctx = Context(
        job_id=spec.job_id, operation=spec.operation, attempt=spec.attempt, workdir=plan.workdir,
        output_dir=plan.output_dir, limits=plan.limits.as_dict(),
        settings=dict(spec.handler.settings), send=writer.send,
    )
    try:
        payload = spec.handler.validate(spec.data)
        layers = layers + sandbox.confine(plan, spec.handler.input_paths(payload))
        writer.send({"type": "sandbox", "layers": layers})
        out = spec.handler.execute(ctx, payload)
        writer.send(_result_message(out))
        return ExitCode.OK
    except MemoryError:
        _send_error(writer, ErrorCode.MEMORY_LIMIT, "the job ran out of memory (MemoryError)",
                    retryable=False)
        return ExitCode.MEMORY
    except (HandlerError, MessageTooLarge) as e:
        _send_error(writer, ErrorCode.EXECUTION_ERROR, str(e), retryable=getattr(e, "retryable", False))
        return ExitCode.HANDLER_FAILED
    except Exception as e:
        _print_exc()
        _send_error(writer, ErrorCode.EXECUTION_ERROR, f"{type(e).__name__}: {e}", retryable=True,
                    tb=traceback.format_exc(limit=20))
        return ExitCode.HANDLER_FAILED


def _result_message(out: Any) -> dict[str, Any]:
    if isinstance(out, HandlerResult):
        return {"type": "result", "data": out.data, "output_file": out.output_file,
                "artifacts": out.artifacts}
    return {"type": "result", "data": out, "output_file": None, "artifacts": []}


def _send_error(
    writer: MessageWriter, code: ErrorCode, message: str, retryable: bool, tb: str | None = None
) -> None:
    try:
        writer.send({"type": "error", "code": code.value, "message": message[:4000],
                     "retryable": retryable, "traceback": tb})
    except Exception:
        _print_exc()


def _reset_logging() -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _print_exc() -> None:
    try:
        traceback.print_exc()
        sys.stderr.flush()
    except BaseException:
        pass
