"""Handlers for the test suite: each misbehaves in one way the worker must contain."""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from handlers.base import Context, Handler, HandlerResult
from worker.errors import HandlerError, RetryableError

if os.environ.get("GKW_TEST_ZYGOTES_DIE") and sys.argv[:1] == ["-c"]:
    os._exit(3)  # imported in a zygote (`python -c`), as one that cannot set itself up
if os.environ.get("GKW_TEST_ZYGOTES_DIE_ON_FORK") and sys.argv[:1] == ["-c"]:
    os.register_at_fork(after_in_parent=lambda: os._exit(4))  # set up, then dies on each fork


def _ledger(ctx: Context) -> None:
    """Append one line per execution to <output_dir>/<job_id>.runs (counts attempts)."""
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    with open(ctx.output_dir / f"{ctx.job_id}.runs", "a") as f:
        f.write(f"{ctx.attempt} {os.getpid()}\n")


def _forever() -> None:
    while True:
        time.sleep(3600)


def host_pid() -> int:
    """This process's pid as the host sees it (a job may run in its own PID namespace)."""
    return int(os.readlink("/proc/self"))


def _grandchild(ctx: Context) -> None:
    r, w = os.pipe()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.write(w, str(host_pid()).encode())
        _forever()
    (ctx.workdir / "grandchild.pid").write_bytes(os.read(r, 32))


def _spin() -> None:
    while True:
        pass


class MisbehavingHandler(Handler):
    """`test.<behaviour>`: sleep, alloc, spin, grandchild, segv, exit, raise, retry, echo."""

    name = "misbehaving"
    operations = ("test.sleep", "test.alloc", "test.spin", "test.grandchild", "test.segv",
                  "test.exit", "test.raise", "test.retry", "test.ledger", "test.print")
    payload_types = ()

    def execute(self, ctx: Context, payload: Any) -> HandlerResult:
        data = payload if isinstance(payload, dict) else {}
        _ledger(ctx)
        ctx.report_progress("execution", 10, f"{ctx.operation} starting")
        behaviour = ctx.operation.split(".", 1)[1]
        if behaviour == "sleep":
            if "seconds" in data:
                time.sleep(float(data["seconds"]))
            else:
                _forever()
        elif behaviour == "alloc":
            block = bytearray(int(data.get("mb", 2048)) << 20)
            block[:: 4096] = b"x" * len(block[:: 4096])
        elif behaviour == "spin":
            _spin()
        elif behaviour == "grandchild":
            _grandchild(ctx)
            if data.get("wait"):
                _forever()
        elif behaviour == "segv":
            ctypes.string_at(0)
        elif behaviour == "exit":
            os._exit(int(data.get("code", 3)))
        elif behaviour == "raise":
            if data.get("permanent"):
                raise HandlerError(str(data.get("message", "permanent failure")))
            raise RuntimeError(str(data.get("message", "boom")))
        elif behaviour == "retry":
            if data.get("say"):
                print(f"attempt {ctx.attempt}", flush=True)
            if ctx.attempt < int(data.get("succeed_on", 2)) and data.get("plant_log"):
                os.unlink("stdout.log")  # its next attempt opens this name as root
                os.symlink(data["plant_log"], "stdout.log")
            if ctx.attempt < int(data.get("succeed_on", 2)):
                raise RetryableError(f"transient failure on attempt {ctx.attempt}")
        elif behaviour == "print":
            print("hello on stdout", flush=True)
            os.write(2, b"hello on stderr\n")
        ctx.report_progress("execution", 100, "done")
        return HandlerResult(data={"behaviour": behaviour, "attempt": ctx.attempt})


def _attempt(action: str, arg: Any) -> str:
    """Try one thing a hostile job might do; return 'ok ...' or the error it met."""
    try:
        return "ok " + str(_ACTIONS[action](arg))
    except OSError as e:
        return f"{type(e).__name__}: errno {e.errno}"


def _connect(arg: Any) -> str:
    import socket

    with socket.create_connection((arg["host"], int(arg["port"])), timeout=2):
        return "connected"


def _syscall(name: str) -> int:
    numbers = {"unshare": 272, "mount": 165, "keyctl": 250, "ptrace": 101}
    libc = ctypes.CDLL(None, use_errno=True)
    args = {"unshare": (0x40000000,), "ptrace": (0, 0, 0, 0)}.get(name, (0, 0, 0, 0, 0))
    if libc.syscall(numbers[name], *args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return 0


def _fork_bomb(limit: int) -> int:
    """Fork sleeping children until refused (or `limit`); return how many were made."""
    made = []
    try:
        for _ in range(limit):
            pid = os.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            made.append(pid)
    except OSError:
        pass
    for pid in made:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return len(made)


def _daemon(path: str) -> int:
    """Double-fork and setsid, like a daemon escaping its session; write the escaper's host pid."""
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.write(w, str(host_pid()).encode())
            _forever()
        os._exit(0)
    pid = int(os.read(r, 32))
    with open(path, "w") as f:
        f.write(str(pid))
    return pid


def _leave_daemon(hold: Any) -> None:
    """Leave behind a daemonised grandchild that made what `hold()` returns and keeps it;
    return once it has (its error, if any, comes back as OSError)."""
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            try:
                kept = hold()  # noqa: F841 - held until the job's namespace ends
            except OSError as e:
                os.write(w, str(e.errno).encode())
                os._exit(1)
            os.write(w, b"0")
            _forever()
        os._exit(0)
    err = int(os.read(r, 16) or b"0")
    if err:
        raise OSError(err, os.strerror(err))


def _listening_daemon(name: str) -> str:
    """Leave behind a daemonised grandchild listening on the abstract unix socket `name`."""
    import socket

    def listen() -> Any:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind("\0" + name)
        sock.listen()
        return sock

    _leave_daemon(listen)
    return "listening"


def _udp_daemon(port: int) -> str:
    """Leave behind a daemonised grandchild holding UDP `port` bound in this namespace."""
    import socket

    def bind() -> Any:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", int(port)))
        return sock

    _leave_daemon(bind)
    return "bound"


def _udp_bind(port: int) -> str:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", int(port)))
    return "bound"


def _unix_pair(_: Any) -> int:
    import socket

    a, b = socket.socketpair()
    a.sendall(b"x")
    got = len(b.recv(1))
    a.close()
    b.close()
    return got


def _connect_abstract(name: str) -> str:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect("\0" + name)
    return "connected"


def _loopback_up(_: Any) -> int:
    """Try to bring `lo` up (SIOCSIFFLAGS: IFF_UP | IFF_LOOPBACK | IFF_RUNNING)."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, 0x8914, struct.pack("16sH22x", b"lo", 0x49))
    return 0


def _loopback_is_up(_: Any) -> bool:
    """Whether `lo` is up (SIOCGIFFLAGS, IFF_UP)."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        got = fcntl.ioctl(sock, 0x8913, struct.pack("16sH22x", b"lo", 0))
    return bool(struct.unpack_from("16sH", got)[1] & 0x1)


def _fds() -> dict[int, str]:
    """What each open fd of this process refers to (the listing's own fd left out)."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the fd os.listdir had open
            continue
    return out


def _run(argv: list[str]) -> str:
    import subprocess

    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()


_HELD: list[bytearray] = []


def threads_after_fork(_: Any = None) -> int:
    """Fork while a second thread runs; return how many threads the forked child's
    `threading` believes it has (1 once the at-fork hooks ran in it)."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, str(threading.active_count()).encode())
        os._exit(0)
    os.close(w)
    seen = int(os.read(r, 16))
    os.waitpid(pid, 0)
    stop.set()
    thread.join()
    return seen


def _hold(mb: int) -> bytearray:
    """Touch `mb` MiB and keep it until the process exits (its exit then takes a while)."""
    block = bytearray(mb << 20)
    block[::4096] = b"x" * len(block[::4096])
    _HELD.append(block)
    return block


_ACTIONS: dict[str, Any] = {
    "read": lambda p: len(Path(p).read_bytes()),
    "write": lambda p: Path(p).write_text("x"),
    "chmod": lambda pm: os.chmod(pm[0], int(pm[1], 8)),
    "xattr": lambda p: os.setxattr(p, "user.note", b"left by a job"),
    "netns": lambda _: os.stat("/proc/self/ns/net").st_ino,
    "sleep": lambda seconds: time.sleep(float(seconds)),
    "listen_abstract": _listening_daemon,
    "connect_abstract": _connect_abstract,
    "udp_daemon": _udp_daemon,
    "udp_bind": _udp_bind,
    "unix_pair": _unix_pair,
    "loopback_up": _loopback_up,
    "loopback_is_up": _loopback_is_up,
    "setuid0": lambda _: os.setuid(0),
    "run": _run,
    "connect": _connect,
    "syscall": _syscall,
    "forkbomb": _fork_bomb,
    "daemon": _daemon,
    "whoami": lambda _: f"uid={os.getuid()} euid={os.geteuid()} pid={os.getpid()}",
    "print": lambda text: print(text),  # no flush: the worker must not lose it
    "log": lambda text: logging.getLogger("probe").warning(text),
    "hold": lambda mb: len(_hold(int(mb))),
    "threads_after_fork": threads_after_fork,
    "rlimit": lambda name: resource.getrlimit(getattr(resource, name)),
    "nice": lambda _: os.getpriority(os.PRIO_PROCESS, 0),
    "fds": lambda _: _fds(),
    # the environment as Python sees it, and as a program it runs gets it (the C environ)
    "env": lambda _: {"python": dict(os.environ),
                      "c": dict(line.split("=", 1) for line in _run(["/usr/bin/env"]).splitlines())},
}


class ProbeHandler(Handler):
    """`test.probe`: tries each action in payload.data['actions'] and reports what happened."""

    name = "probe"
    operations = ("test.probe",)
    payload_types = ("test.probe.v1",)

    def input_paths(self, payload: Any) -> list[str]:
        return list(payload.get("inputs", []))

    def execute(self, ctx: Context, payload: Any) -> HandlerResult:
        out = [_attempt(a, arg) for a, arg in payload["actions"]]
        if payload.get("then_sleep"):
            _forever()
        return HandlerResult(data={"outcomes": out})


class Count(BaseModel):
    """The payload of `test.schema`."""

    count: int
    label: str = "x"


class SchemaHandler(Handler):
    """`test.schema`: validates payload.data against a pydantic model before fork."""

    name = "schema"
    operations = ("test.schema",)
    payload_types = ("test.schema.v1",)
    payload_model = Count

    def execute(self, ctx: Context, payload: Any) -> HandlerResult:
        assert isinstance(payload, Count)
        return HandlerResult(data={"doubled": payload.count * 2})


_PREPARED_IN: list[int] = []


class WarmHandler(Handler):
    """`test.warm`: has a real prepare(), so its jobs are forked from the warm zygote."""

    name = "warm"
    operations = ("test.warm",)
    payload_types = ("test.warm.v1",)

    def prepare(self) -> None:
        fails = os.environ.get("GKW_TEST_PREPARE_FAILS")  # "1": always; a path: while it exists
        if fails and (fails == "1" or os.path.exists(fails)):
            raise RuntimeError("prepare() failed on purpose")
        _PREPARED_IN.append(os.getpid())
        # variables set while preparing, through Python and behind its back in C
        os.environ["GKW_PREPARED_PY"] = "set in prepare()"
        ctypes.CDLL(None).setenv(b"GKW_PREPARED_C", b"set in prepare()", 1)

    def execute(self, ctx: Context, payload: Any) -> HandlerResult:
        ctx.report_progress("execution", 10, "warm")
        if isinstance(payload, dict) and payload.get("seconds") and ctx.attempt == 1:
            time.sleep(float(payload["seconds"]))  # only the first attempt is slow
        return HandlerResult(data={"prepared_in": _PREPARED_IN, "parent": os.getppid(),
                                   "env": sorted(os.environ),
                                   "program_env": sorted(line.split("=", 1)[0] for line in
                                                         _run(["/usr/bin/env"]).splitlines())})


class NetHandler(Handler):
    """`test.net`: needs the network; reports the network interfaces it sees."""

    name = "net"
    operations = ("test.net",)
    payload_types = ("test.net.v1",)
    needs_network = True

    def execute(self, ctx: Context, payload: Any) -> HandlerResult:
        return HandlerResult(data={"interfaces": sorted(n for _, n in socket.if_nameindex())})


class AbsentHandler(Handler):
    """`test.absent`: unavailable, as a handler whose optional extra is missing, whenever
    GKW_TEST_ABSENT names a reason."""

    name = "absent"
    operations = ("test.absent",)
    payload_types = ()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return os.environ.get("GKW_TEST_ABSENT") or None

    def execute(self, ctx: Context, payload: Any) -> HandlerResult:
        return HandlerResult(data={"present": True})
