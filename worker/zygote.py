"""Zygotes: small pre-imported processes that fork every job child and spare for the supervisor.

Fork cost grows with the forking process's memory, and the supervisor's grows with its queue.
A zygote is a fresh interpreter, executed once at start, that imports only what a child needs,
so a fork costs the same whatever the supervisor holds and the supervisor never forks a job.
The lean zygote (`gkw-forker`) forks spares and plain jobs; handlers with a costly `prepare()`
or a payload model get a warm one (`gkw-zygote`) that prepares them once. Requests and
reports are pickled over a SOCK_SEQPACKET pair and a child's pipe ends travel with its
request as SCM_RIGHTS. A spare's fork is not waited for (its pid comes back as a report); a
job's pid is read later in the same loop pass (`request`, then `await_pid`). The zygote
reports every child's end with its wait status and rusage, and once set up that it is ready
(with how many at-fork hooks its children skip: see `forkhooks`).
"""

from __future__ import annotations

import array
import contextlib
import os
import pickle
import resource
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

from handlers.base import Handler
from worker import forkhooks, landlock, sandbox, signals, syscall_filter
from worker.child import (
    READY,
    ChildSpec,
    child_failed,
    prepare_inheritance,
    run_child,
    run_spare,
    warm_up,
)
from worker.netns import NetPool

#: A report: ("spawned", token, pid), ("failed", token, why), ("exited", pid, status, rusage)
#: or, once set up, ("ready", how many at-fork hooks its children skip). An exit's rusage
#: travels as a plain tuple (pickling an object in the zygote wrote 11 more of its pages per
#: job, each one copied while a child shared it) and is read back as wait4's struct_rusage.
Report = tuple[Any, ...]
_INLINE = 1 << 16  # a larger job spec travels in a memfd
_RECV = 1 << 20
#: A zygote that has not answered for a job's fork in this long is taken for hung: it is
#: killed (a new one starts once its exit is reaped) and the job is not started. Well
#: below the units' WatchdogSec=, which would otherwise restart the whole service.
FORK_REPLY_TIMEOUT = 10.0
#: Hooks that only reset other threads' locks are held back before anything imports them.
_BOOT = "from worker import forkhooks; forkhooks.defer(); from worker.zygote import main; main()"


class Zygote:
    """The supervisor's handle on one zygote process."""

    def __init__(self, name: str, handlers: Mapping[str, Handler], prepare: bool,
                 read_paths: tuple[str, ...] = (), landlock_abi: int = 0,
                 seccomp: tuple[bytes | None, ...] = ()) -> None:
        self.name = name
        self.handlers = dict(handlers)  # the operations it forks jobs (and spares) for
        self.prepare = prepare  # run each handler's prepare() once, before any fork
        #: every job's Landlock read paths, anchored once in the zygote (`landlock.anchor`)
        self.anchors = (read_paths, landlock_abi)
        self.seccomp = seccomp  # the programs its children load, prepared once for them
        self.pid = 0
        self.ready = False  # it reported itself set up (a zygote that dies before never was)
        self.ready_at = 0.0  # when (monotonic)
        self.hung = False  # killed for not answering a fork: its death is a failure
        self.sock: socket.socket | None = None
        self.pending: list[Report] = []  # reports read while waiting for a job's fork
        self._poller = select.poll()  # its socket, for a wait with a deadline
        self._token = 0

    def start(self) -> None:
        """Execute the zygote (a fresh interpreter that dies with us) and send it its handlers."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        me = os.getpid()
        env = dict(os.environ)
        home = str(Path(__file__).resolve().parent.parent)  # where `worker` is importable from
        env["PYTHONPATH"] = os.pathsep.join(p for p in (home, env.get("PYTHONPATH")) if p)
        argv = [sys.executable, "-c", _BOOT, str(theirs.fileno()), str(me)]
        sys.stdout.flush()
        sys.stderr.flush()
        with signals.blocked():
            pid = os.fork()
            if pid == 0:  # pragma: no cover - replaced by exec
                _exec(argv, env, me, theirs.fileno())
        theirs.close()
        self.pid, self.sock = pid, ours
        self._poller.register(ours, select.POLLIN)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it died at once:
            self._send(("setup", self.name, list(sys.path), self.handlers, self.prepare,
                        self.anchors, self.seccomp), [])  # its exit is reaped as any

    def fileno(self) -> int:
        """The fd the selector watches for reports."""
        assert self.sock is not None
        return self.sock.fileno()

    def request(self, spec: ChildSpec, pipe_w: int) -> int:
        """Ask the zygote to fork a child for `spec`; return the token to `await_pid` with.

        The spec travels pickled and is decoded by the child, not by the zygote: what the
        zygote writes after a fork is copied for every child still sharing its pages.
        """
        token = self._next()
        data = pickle.dumps(spec)
        box = (spec.plan.pid_ns, spec.plan.kept_net)
        if len(data) <= _INLINE:
            self._send(("job", token, (*box, data)), [pipe_w])
        else:
            memfd = os.memfd_create("gkw-spec", os.MFD_CLOEXEC)
            try:
                os.write(memfd, data)
                self._send(("job", token, (*box, None)), [pipe_w, memfd])
            finally:
                os.close(memfd)
        return token

    def await_pid(self, token: int) -> int:
        """Wait for the pid of the child asked for with `token` (OSError if it could not be
        forked, or when the zygote did not answer within FORK_REPLY_TIMEOUT: it is killed);
        the other reports read meanwhile wait in `pending`."""
        deadline = time.monotonic() + FORK_REPLY_TIMEOUT
        while True:
            if not self._readable_by(deadline):
                self.hung = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                raise OSError(f"the {self.name} did not answer in {FORK_REPLY_TIMEOUT:.0f} s; "
                              "it was killed and starts again")
            report = self._receive(block=True)
            assert report is not None
            if report[0] in ("spawned", "failed") and report[1] == token:
                if report[0] == "failed":
                    raise OSError(f"the {self.name} could not fork: {report[2]}")
                return int(report[2])
            self.pending.append(report)

    def spare(self, base: sandbox.Plan, orders_r: int, messages_w: int) -> int:
        """Ask for a spare in `base`'s outer box; return the token its report will carry."""
        token = self._next()
        self._send(("spare", token, base), [orders_r, messages_w])
        return token

    def reports(self) -> list[Report]:
        """Every report that arrived since the last call, without blocking; OSError once the
        zygote has gone and every report it sent was read."""
        out, self.pending = self.pending, []
        try:
            while (report := self._receive(block=False)) is not None:
                out.append(report)
        except OSError:
            if not out:
                raise
        return out

    def close(self) -> None:
        """Stop the zygote (its children die with it by PDEATHSIG)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def _next(self) -> int:
        self._token += 1
        return self._token

    def _send(self, msg: Any, fds: list[int]) -> None:
        assert self.sock is not None
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([pickle.dumps(msg)], anc)

    def _readable_by(self, deadline: float) -> bool:
        """Whether a report (or the zygote's end) can be read before `deadline`."""
        return bool(self._poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))

    def _receive(self, block: bool) -> Report | None:
        assert self.sock is not None
        try:
            data = self.sock.recv(_RECV, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        if not data:
            raise OSError(f"the {self.name} has gone away")
        report: Report = pickle.loads(data)
        if report[0] == "exited":
            report = (*report[:3], resource.struct_rusage(report[3]))
        return report


def _exec(argv: list[str], env: dict[str, str], parent: int, fd: int) -> NoReturn:
    """In the forked child: die with the supervisor, keep the socket open across exec."""
    try:
        sandbox.prctl(sandbox.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)
        os.set_inheritable(fd, True)
        os.execve(argv[0], argv, env)
    finally:
        os._exit(127)


def main() -> NoReturn:
    """The zygote's life (`python -c` entry point): set up, then fork on request until EOF."""
    code = 1
    try:
        fd, parent = int(sys.argv[1]), int(sys.argv[2])
        if os.getppid() != parent:  # the supervisor died before we got here
            os._exit(1)
        signals.reset_in_child()  # exec kept the mask the supervisor forked us with
        for sig in (signal.SIGINT, signal.SIGHUP):  # a terminal's signals are the supervisor's
            signal.signal(sig, signal.SIG_IGN)
        sock = socket.socket(fileno=fd)
        os.set_inheritable(fd, False)
        _, name, path, handlers, prepare, (read_paths, abi), seccomp = _request(sock)[0]
        sys.path[:] = path
        sandbox.set_name(name)
        sandbox.become_subreaper()
        for h in {id(h): h for h in handlers.values()}.values() if prepare else []:
            h.prepare()
        prepare_inheritance()
        if abi:
            landlock.anchor(read_paths, abi)
        syscall_filter.prepare(*seccomp)
        warm_up(read_paths, abi)
        sock.send(pickle.dumps(("ready", forkhooks.settle())))
        _Server(sock, handlers).loop()
        code = 0
    except BaseException:  # on the supervisor's stderr, or it never knows why
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _request(sock: socket.socket) -> tuple[Any, list[int]]:
    """One request and the fds that came with it; (None, []) at end of file."""
    fds = array.array("i")
    data, ancdata, _, _ = sock.recvmsg(_RECV, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return (pickle.loads(data) if data else None), list(fds)


class _Server:
    """The zygote's side: fork what is asked, report every child's end."""

    def __init__(self, sock: socket.socket, handlers: Mapping[str, Handler]) -> None:
        self.sock = sock
        self.handlers = handlers
        self.boxing: dict[int, tuple[int, int]] = {}  # readiness fd -> (token, pid) of a spare
        self.nets = NetPool()
        self.renice = sandbox.may_raise_priority()  # spares box themselves at a low priority
        self.poller = select.poll()  # not select(): a zygote may hold fds above 1023

    def loop(self) -> None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for fd in (self.sock.fileno(), r):
            self.poller.register(fd, select.POLLIN)
        while True:
            ready = {fd for fd, _ in self.poller.poll()}
            if r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(r, 4096)
            for fd in ready & self.boxing.keys():
                self._spare_ready(fd)
            if r in ready:
                self._report_exits()  # after any readiness of the same spare
            if self.sock.fileno() in ready and not self._serve_one():
                return

    def _spare_ready(self, fd: int) -> None:
        """A spare finished boxing itself (it may be given a job now), or died trying."""
        token, pid = self.boxing.pop(fd)
        self.poller.unregister(fd)
        try:
            said = os.read(fd, len(READY))
        except OSError:
            said = b""
        os.close(fd)
        if said == READY:
            self._send(("spawned", token, pid))
        else:
            self._send(("failed", token, f"spare child {pid} died while boxing itself "
                                         "(its error is in the zygote's stderr)"))

    def _serve_one(self) -> bool:
        """Serve one request; False when the supervisor closed its end."""
        msg, fds = _request(self.sock)
        if msg is None:
            return False
        kind, token, body = msg
        try:
            if kind == "job":
                pid_ns, kept_net, blob = body
                pid = self._fork(pid_ns, kept_net, lambda net: self._run_job(blob, fds, net))
            else:
                self._fork_spare(token, body, fds)
                return True
        except OSError as e:
            self._send(("failed", token, str(e)))
        else:
            self._send(("spawned", token, pid))
        finally:
            for fd in fds:
                os.close(fd)
        return True

    def _run_job(self, blob: bytes | None, fds: list[int], net: int) -> NoReturn:
        """In the new child: decode its spec and run it with this zygote's handler."""
        try:
            spec: ChildSpec = pickle.loads(blob if blob is not None else _read_memfd(fds[1]))
            handler = self.handlers[spec.operation]
        except BaseException:
            child_failed()
        run_child(spec, handler, fds[0], net)

    def _fork_spare(self, token: int, base: sandbox.Plan, fds: list[int]) -> None:
        """Fork a spare; it is reported once it says it is boxed (the supervisor renames its
        work dir when it hands it a job, so it must be done with that dir by path)."""
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = self._fork(base.pid_ns, base.kept_net,
                             lambda net: run_spare(base, self.handlers, fds[0], fds[1], w, net,
                                                   self.renice))
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        self.boxing[r] = (token, pid)
        self.poller.register(r, select.POLLIN)

    def _fork(self, pid_ns: bool, kept_net: bool, run: Callable[[int], NoReturn]) -> int:
        """Fork a child that calls `run` with the fd of a kept network namespace lent to it
        (when `kept_net`; else -1)."""
        net = self.nets.lend() if kept_net else -1
        mask = signals.block()
        try:
            pid = sandbox.fork_job(pid_ns)
            if pid == 0:
                self.sock.close()
                run(net)
        except BaseException:
            if net >= 0:
                self.nets.back(net)
            raise
        finally:
            signals.restore(mask)
        if net >= 0:
            self.nets.lent_to(pid, net)
        return pid

    def _report_exits(self) -> None:
        for pid, status, ru in sandbox.reaped():
            self.nets.reaped(pid)
            self._send(("exited", pid, status, tuple(ru)))

    def _send(self, msg: Report) -> None:
        self.sock.send(pickle.dumps(msg))


def _read_memfd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0)
