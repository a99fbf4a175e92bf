"""sd_notify against a real AF_UNIX datagram receiver: exact bytes, sender pid, no-op paths."""

from __future__ import annotations

import os
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker import systemd

_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Receiver:
    """A bound datagram socket standing in for systemd's notification socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def receive(self) -> tuple[bytes, tuple[int, int, int]]:
        """The next datagram and the (pid, uid, gid) the kernel attached to it."""
        data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(_CREDS.size))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, uid, gid = _CREDS.unpack(payload[: _CREDS.size])
                return data, (pid, uid, gid)
        raise AssertionError("datagram arrived without SCM_CREDENTIALS")

    def assert_empty(self) -> None:
        """Fail if any datagram is waiting."""
        self.sock.setblocking(False)
        try:
            with pytest.raises(BlockingIOError):
                self.sock.recv(4096)
        finally:
            self.sock.settimeout(5)


def _bind(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(address)
    sock.settimeout(5)  # an upper bound on a broken test, not a synchronisation
    return sock


@pytest.fixture(params=["path", "abstract"])
def receiver(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Receiver]:
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        sock, env_value = _bind(path), path
    else:
        name = f"guestkit-test-{uuid.uuid4().hex}"
        sock, env_value = _bind("\0" + name), "@" + name
    monkeypatch.setenv("NOTIFY_SOCKET", env_value)
    with sock:
        yield Receiver(sock, env_value)


def test_ready_sends_exact_bytes_with_our_pid(receiver: Receiver) -> None:
    assert systemd.ready() is True
    data, (pid, uid, gid) = receiver.receive()
    assert data == b"READY=1"
    assert (pid, uid, gid) == (os.getpid(), os.getuid(), os.getgid())


def test_several_fields_go_in_one_datagram(receiver: Receiver) -> None:
    assert systemd.notify("READY=1", "STATUS=idle", "MAINPID=1") is True
    assert receiver.receive()[0] == b"READY=1\nSTATUS=idle\nMAINPID=1"
    receiver.assert_empty()


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda: systemd.status("running 3/8, queued 12"), b"STATUS=running 3/8, queued 12"),
        (lambda: systemd.status("two\nlines\r\n"), b"STATUS=two lines"),
        (lambda: systemd.stopping(), b"STOPPING=1"),
        (lambda: systemd.stopping("draining 2 jobs"), b"STOPPING=1\nSTATUS=draining 2 jobs"),
        (lambda: systemd.ready("idle"), b"READY=1\nSTATUS=idle"),
        (lambda: systemd.watchdog(), b"WATCHDOG=1"),
        (lambda: systemd.extend_timeout(1.5), b"EXTEND_TIMEOUT_USEC=1500000"),
        (lambda: systemd.extend_timeout(-3), b"EXTEND_TIMEOUT_USEC=0"),
        (lambda: systemd.status("état ✓"), "STATUS=état ✓".encode()),
    ],
)
def test_helpers_send_exact_bytes(receiver: Receiver, call: object, expected: bytes) -> None:
    assert callable(call)
    assert call() is True
    assert receiver.receive()[0] == expected


def test_reloading_carries_a_monotonic_timestamp(receiver: Receiver) -> None:
    before = time.monotonic_ns() // 1000
    assert systemd.reloading() is True
    fields = receiver.receive()[0].decode().split("\n")
    assert fields[0] == "RELOADING=1"
    key, _, value = fields[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert int(value) >= before


def test_forked_child_is_seen_with_its_own_pid(receiver: Receiver) -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0 if systemd.watchdog() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    data, (sender, _, _) = receiver.receive()
    assert data == b"WATCHDOG=1"
    assert sender == pid  # systemd's NotifyAccess=main would drop this one


def test_without_notify_socket_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    results = [
        systemd.notify("READY=1"),
        systemd.ready(),
        systemd.status("x"),
        systemd.stopping(),
        systemd.watchdog(),
        systemd.extend_timeout(10),
        systemd.reloading(),
    ]
    assert results == [False] * 7


@pytest.mark.parametrize("value", ["", "relative/notify.sock", "@", "vsock:2:1234"])
def test_unusable_addresses_return_false(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert systemd.ready() is False


def test_dead_socket_returns_false_without_raising(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert systemd.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "@guestkit-test-nobody-" + uuid.uuid4().hex)
    assert systemd.watchdog() is False


def test_socket_that_is_not_a_datagram_socket_returns_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "stream.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream:
        stream.bind(path)
        stream.listen()
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert systemd.ready() is False


def test_no_fields_sends_nothing(receiver: Receiver) -> None:
    assert systemd.notify() is False
    receiver.assert_empty()


class TestWatchdogInterval:
    def test_unset_means_no_pings(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        assert systemd.watchdog_interval() is None

    def test_half_of_the_timeout(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("WATCHDOG_USEC", "30000000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        assert systemd.watchdog_interval() == 15.0

    def test_our_pid_is_honoured(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("WATCHDOG_USEC", "4000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        assert systemd.watchdog_interval() == 2.0

    def test_another_pid_means_not_for_us(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("WATCHDOG_USEC", "4000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
        assert systemd.watchdog_interval() is None

    @pytest.mark.parametrize("usec", ["", "0", "-5", "abc", "1.5", "٣"])
    def test_garbage_means_no_pings(self, monkeypatch: pytest.MonkeyPatch, usec: str) -> None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        assert systemd.watchdog_interval() is None

    def test_garbage_pid_means_not_for_us(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("WATCHDOG_USEC", "4000000")
        monkeypatch.setenv("WATCHDOG_PID", "self")
        assert systemd.watchdog_interval() is None


def test_notify_never_blocks_on_a_receiver_that_stopped_reading(tmp_path, monkeypatch) -> None:
    import socket as _socket

    from worker import systemd as _systemd

    path = tmp_path / "full.sock"
    receiver = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    receiver.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    sent = [_systemd.notify("WATCHDOG=1") for _ in range(200)]  # far past max_dgram_qlen
    assert sent[0] is True
    assert sent[-1] is False  # dropped, not blocked
    receiver.close()
