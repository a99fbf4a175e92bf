"""What runs after fork: enter the sandbox, run the handler, report over the pipe, `os._exit`."""

from __future__ import annotations

import dataclasses
import encodings.idna  # noqa: F401 - lazy imports fail once the job runs as another user
import logging
import os
import pickle
import socket  # noqa: F401 - ditto
import struct
import subprocess  # noqa: F401 - ditto
import sys
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from handlers.base import Context, Handler, HandlerResult
from worker import forkhooks, sandbox, signals
from worker.errors import ErrorCode, ExitCode, HandlerError
from worker.progress import MessageTooLarge, MessageWriter

SPARE_NAME = "gkw-spare"  #: process name of a spare waiting for its job
#: A spare boxes itself at this nice value (back to 0 before it drops privileges), so that
#: the slow part of its set-up takes only CPU that no running job wants.
SPARE_NICE = 10
JOB_NAME = "gkw-job"  #: process name of a child running a job
READY = b"r"  #: what a spare writes to its readiness pipe once it is boxed


@dataclass(frozen=True)  # no slots: a slotted frozen dataclass unpickles in Python code
class ChildSpec:
    """Everything a job child needs, decided by the supervisor before fork (its handler is
    the zygote's own, by operation)."""

    job_id: str
    operation: str
    attempt: int
    data: Any
    plan: sandbox.Plan
    message_cap: int


def prepare_inheritance() -> None:
    """Set up, once in a zygote, what each of its children would otherwise redo: logging to
    stderr (a child's fd 2 is its job's stderr.log) and the jobs' base environment."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sandbox.base_environment()


#: Calls enough for CPython 3.11 to have specialised a function's bytecode.
WARM_UP_CALLS = 30
#: The environment a rehearsal sets: the keys every job gets (`Supervisor._child_env`).
REHEARSAL_ENV = {"GUESTKIT_JOB_ID": "x", "GUESTKIT_OPERATION": "x", "GUESTKIT_ATTEMPT": "1"}


def warm_up(read_paths: tuple[str, ...] = (), landlock_abi: int = 0) -> None:
    """In a zygote: rehearse its children's start (see `rehearse`), and with `landlock_abi`
    build a Landlock ruleset from the anchored `read_paths` (never enforced), until that
    code is specialised.

    A child running a function its zygote never ran rewrites the function's bytecode in
    place, copying the pages it lives in (2.6 us a page here): a spare set its environment
    in 360 us cold, 118 us warm.
    """
    base = sandbox.Plan(workdir="/", output_dir="/", env={},
                        limits=sandbox.Limits(1, 1, 1, 1, 1), read_paths=read_paths,
                        landlock_abi=landlock_abi)
    for _ in range(WARM_UP_CALLS):
        rehearse(base)
        if landlock_abi:
            os.close(sandbox.landlock_ruleset(base))


def rehearse(base: sandbox.Plan) -> None:
    """Run on a stand-in order the steps of a job's start that only compute (its
    environment, decoding its order, its plan and spec, its context, a message), then
    set the base environment again; nothing of it leaves the process.

    A zygote does it to specialise that code; a spare, to take before its job comes the
    copy-on-write faults of the pages those steps write (about 6 us each here).
    """
    sandbox.scrub_environment(base.workdir, REHEARSAL_ENV)
    order = Order(job_id="x", operation="x", attempt=1, data={}, workdir=base.workdir,
                  limits=base.limits, env=REHEARSAL_ENV, nproc=None, message_cap=1 << 16)
    spec = job_spec(base, decode_order(encode_order(order)[4:]))
    plan = spec.plan
    Context(job_id=spec.job_id, operation=spec.operation, attempt=spec.attempt,
            workdir=plan.workdir, output_dir=plan.output_dir, limits=plan.limits.as_dict(),
            settings={}, send=_ignore)
    MessageWriter(-1, spec.message_cap).encode({"type": "sandbox", "layers": plan.layers})
    sandbox.base_environment()


def _ignore(_message: dict[str, Any]) -> None:
    """Where a rehearsal's context sends its messages: nowhere."""


def job_spec(base: sandbox.Plan, order: Order) -> ChildSpec:
    """A spare's job as a freshly forked child would have it: `base` with the order's parts."""
    plan = dataclasses.replace(base, workdir=order.workdir, limits=order.limits, env=order.env,
                               nproc=order.nproc)
    return ChildSpec(job_id=order.job_id, operation=order.operation, attempt=order.attempt,
                     data=order.data, plan=plan, message_cap=order.message_cap)


def run_child(spec: ChildSpec, handler: Handler, pipe_fd: int, net: int = -1) -> NoReturn:
    """Run one job in this freshly forked process (in the kept network namespace `net`, when
    not -1); never returns."""
    code = ExitCode.SANDBOX
    try:
        signals.reset_in_child()
        forkhooks.restore()  # the job's own forks run every at-fork hook
        layers = sandbox.enter_privileged(spec.plan, net)
        code = run_boxed(spec, handler, pipe_fd, layers)
    except BaseException:  # the sandbox failed: nothing of the job ran
        _print_exc()
    finally:
        os._exit(code)


def child_failed() -> NoReturn:
    """End a child that could not even start its job: the error to stderr, exit SANDBOX."""
    _print_exc()
    os._exit(ExitCode.SANDBOX)


def run_spare(base: sandbox.Plan, handlers: Mapping[str, Handler], orders_fd: int,
              pipe_fd: int, ready_fd: int, net: int = -1, renice: bool = False) -> NoReturn:
    """Box itself as far as no job is needed, wait for one order, then run that job; never
    returns. The supervisor renames the spare's work dir to the job's before the order.
    `net`: a kept network namespace to join, as for `run_child`; `renice`: box itself at
    SPARE_NICE (only when it may come back to 0: see `sandbox.may_raise_priority`).

    It writes READY to `ready_fd` and closes it once it is done with its work dir by path;
    a spare that dies first closes it without. End of file on `orders_fd` with no order
    means the spare is no longer wanted: exit 0.
    """
    code = ExitCode.SANDBOX
    try:
        signals.reset_in_child()
        forkhooks.restore()  # as in run_child
        sandbox.set_name(SPARE_NAME)
        if renice:
            os.setpriority(os.PRIO_PROCESS, 0, SPARE_NICE)
        layers = sandbox.enter_privileged(base, net)
        sandbox.premake_workdir(base.workdir, base.uid, base.gid)
        fds, ruleset = sandbox.with_ruleset((pipe_fd, orders_fd, ready_fd),
                                            sandbox.landlock_ruleset(base))
        rehearse(base)  # at the low priority, and before READY: a ready spare idles
        if renice:
            os.setpriority(os.PRIO_PROCESS, 0, 0)  # before the job user, who may not
        layers += sandbox.enter_early(base, *fds, rlimits=False)
        early = sandbox.confine_early(base, ruleset)
        os.write(5, READY)  # ready_fd: boxed
        os.close(5)
        order = read_order(4)
        os.close(4)
        if order is None:
            code = ExitCode.OK
        else:
            spec = job_spec(base, order)
            sandbox.set_name(JOB_NAME)
            layers += sandbox.enter_late(spec.plan, rlimits=True)
            code = _run_handler(spec, handlers[order.operation], MessageWriter(3, spec.message_cap),
                                layers, early)
    except BaseException:
        _print_exc()
    finally:
        os._exit(code)


def run_boxed(spec: ChildSpec, handler: Handler, pipe_fd: int, layers: list[str]) -> ExitCode:
    """The inner box (stdio, fds, rlimits, user, Landlock, seccomp), then the handler."""
    sandbox.set_name(JOB_NAME)
    pipe_fd, early, more = sandbox.enter(spec.plan, pipe_fd)
    writer = MessageWriter(pipe_fd, spec.message_cap)
    return _run_handler(spec, handler, writer, layers + more, early)


@dataclass(frozen=True)  # no slots: see ChildSpec
class Order:
    """What a spare learns of its job; the rest of its ChildSpec it inherited at fork."""

    job_id: str
    operation: str
    attempt: int
    data: Any
    workdir: str
    limits: sandbox.Limits
    env: dict[str, str]
    nproc: int | None
    message_cap: int


def encode_order(order: Order) -> bytes:
    """An order as sent down a spare's pipe: a 4-byte length, then the pickle."""
    blob = pickle.dumps(order, protocol=pickle.HIGHEST_PROTOCOL)
    return struct.pack("!I", len(blob)) + blob


def read_order(fd: int) -> Order | None:
    """Block until a whole order arrives on `fd`; None at end of file before one."""
    head = _read_exactly(fd, 4)
    if head is None:
        return None
    blob = _read_exactly(fd, struct.unpack("!I", head)[0])
    if blob is None:
        return None
    return decode_order(blob)


def decode_order(blob: bytes) -> Order:
    """The order in `blob` (a pickle, as `encode_order` makes it after its length)."""
    order = pickle.loads(blob)
    assert isinstance(order, Order)
    return order


def _read_exactly(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = os.read(fd, n - len(buf))
        except InterruptedError:
            continue
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _run_handler(spec: ChildSpec, handler: Handler, writer: MessageWriter, layers: list[str],
                 early: sandbox.Confinement) -> ExitCode:
    plan = spec.plan
    ctx = Context(
        job_id=spec.job_id, operation=spec.operation, attempt=spec.attempt, workdir=plan.workdir,
        output_dir=plan.output_dir, limits=plan.limits.as_dict(),
        settings=handler.settings, send=writer.send,  # the child's own copy: no dict() of it
    )
    try:
        payload = handler.validate(spec.data)
        layers = layers + sandbox.confine(plan, handler.input_paths(payload), early)
        writer.send({"type": "sandbox", "layers": layers})
        out = handler.execute(ctx, payload)
        message = _result_message(out)
        _flush_stdio()  # the supervisor may end the process as soon as the result arrives
        writer.send(message)
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
    _flush_stdio()
    try:
        writer.send({"type": "error", "code": code.value, "message": message[:4000],
                     "retryable": retryable, "traceback": tb})
    except Exception:
        _print_exc()


def _flush_stdio() -> None:
    """Write out what the handler printed (os._exit would drop Python's buffers); never raise."""
    for stream in (sys.stdout, sys.stderr):
        try:  # noqa: SIM105 - in every child: contextlib.suppress would run contextlib's code too
            stream.flush()
        except BaseException:
            pass


def _print_exc() -> None:
    """Print the exception being handled to stderr (the job's stderr.log); never raise."""
    try:
        traceback.print_exc()
        sys.stderr.flush()
    except BaseException:
        pass
