"""A pre-warmed process that forks jobs of handlers with a costly `prepare()` (guestkit).

The supervisor stays small (fork cost grows with the forking process's memory) while
jobs that need heavy imports start warm. The zygote is forked from the supervisor,
prepares those handlers once, then on request forks a child that runs `run_child`,
exactly as the supervisor would. It reports each child's pid and, when the child ends,
its wait status and rusage. Requests and reports are pickled over a SOCK_SEQPACKET
pair; the job's pipe (write end) travels with the request as SCM_RIGHTS.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import os
import pickle
import select
import signal
import socket
import sys
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, NoReturn

from handlers.base import Handler
from worker import sandbox, signals
from worker.child import ChildSpec, run_child

#: A child's end as the zygote reports it: (pid, wait status, rusage as a namespace).
Exit = tuple[int, int, Any]
_MAX = 1 << 20


class Zygote:
    """The supervisor's handle on its zygote."""

    def __init__(self, handlers: list[Handler]) -> None:
        self.handlers = handlers
        self.pid = 0
        self.sock: socket.socket | None = None
        self.pending: list[Exit] = []

    def start(self) -> None:
        """Fork the zygote (signals blocked) and let it warm up its handlers."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stdout.flush()
        sys.stderr.flush()
        with signals.blocked():
            pid = os.fork()
            if pid == 0:
                ours.close()
                _serve(theirs, self.handlers)
        theirs.close()
        self.pid, self.sock = pid, ours

    def fileno(self) -> int:
        """The fd the selector watches for exit reports."""
        assert self.sock is not None
        return self.sock.fileno()

    def spawn(self, spec: ChildSpec, pipe_w: int) -> int:
        """Have the zygote fork a child for `spec`; return the child's pid (OSError if it died)."""
        assert self.sock is not None
        self.sock.sendmsg([pickle.dumps(spec)],
                          [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [pipe_w]))])
        while True:
            kind, *rest = self._receive(block=True)
            if kind == "spawned":
                return int(rest[0])
            if kind == "failed":
                raise OSError(f"the zygote could not fork: {rest[0]}")
            self.pending.append((int(rest[0]), int(rest[1]), rest[2]))

    def exits(self) -> list[Exit]:
        """Every child end reported since the last call."""
        out, self.pending = self.pending, []
        while True:
            msg = self._receive(block=False)
            if msg is None:
                return out
            if msg[0] == "exited":
                out.append((int(msg[1]), int(msg[2]), msg[3]))

    def _receive(self, block: bool) -> Any:
        assert self.sock is not None
        try:
            data = self.sock.recv(_MAX, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        if not data:
            raise OSError("the zygote has gone away")
        return pickle.loads(data)

    def close(self) -> None:
        """Stop the zygote (its children die with it by PDEATHSIG)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def _serve(sock: socket.socket, handlers: list[Handler]) -> NoReturn:
    """The zygote's life: warm up, then fork children on request and report their ends."""
    code = 1
    try:
        signals.reset_in_child()
        parent = os.getppid()
        sandbox.prctl(sandbox.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)
        sandbox.become_subreaper()
        for h in handlers:
            h.prepare()
        _loop(sock)
        code = 0
    finally:
        os._exit(code)


def _loop(sock: socket.socket) -> None:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)

    def send(msg: Any) -> None:
        sock.send(pickle.dumps(msg))

    while True:
        ready, _, _ = select.select([sock.fileno(), r], [], [])
        if r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(r, 4096)
            _report_exits(send)
        if sock.fileno() in ready and not _fork_one(sock, send):
            return


def _fork_one(sock: socket.socket, send: Callable[[Any], None]) -> bool:
    """Serve one request; False when the supervisor closed its end."""
    fds = array.array("i")
    data, ancdata, _, _ = sock.recvmsg(_MAX, socket.CMSG_SPACE(fds.itemsize))
    if not data:
        return False
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    spec: ChildSpec = pickle.loads(data)
    spec = dataclasses.replace(spec, plan=dataclasses.replace(spec.plan, supervisor_pid=os.getpid()))
    try:
        with signals.blocked():
            pid = sandbox.fork_job(spec.plan.pid_ns)
            if pid == 0:
                sock.close()
                run_child(spec, fds[0])
    except OSError as e:
        send(("failed", str(e)))
    else:
        send(("spawned", pid))
    finally:
        os.close(fds[0])
    return True


def _report_exits(send: Callable[[Any], None]) -> None:
    for pid, status, ru in sandbox.reaped():
        usage = SimpleNamespace(ru_utime=ru.ru_utime, ru_stime=ru.ru_stime,
                                ru_maxrss=ru.ru_maxrss, ru_inblock=ru.ru_inblock,
                                ru_oublock=ru.ru_oublock)
        send(("exited", pid, status, usage))
