"""guestkit-worker as a real systemd service, in a systemd booted with systemd-nspawn.

One container serves the whole module: a small root directory (a copy of /etc, the host's /usr
bound read-only), the checkout, its virtualenv and the interpreter behind it bound read-only at
the same paths as on the host, a private network, cgroup v2 inside (so Delegate=yes is real),
and the units installed with scripts/install-unit.sh plus a handler plugin. Commands run inside
through nsenter; the spool is written and read from the host through the root directory. The
container is always powered off (or killed) at the end. The tests run in file order; each one
starts the service if it is not running.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
import psutil
import pytest
from conftest import job, wait_until

from worker import landlock

pytestmark = pytest.mark.slow

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
UNIT = "guestkit-worker.service"
STATE = Path("/var/lib/guestkit-worker")
PLUGIN_DIR = Path("/opt/gkw-service-test")
DROP_INS = Path("/etc/systemd/system") / f"{UNIT}.d"
#: nspawn's own seccomp filter (systemd 252) refuses Landlock; allow it so that only the unit's
#: SystemCallFilter= decides whether jobs get it.
LANDLOCK_SYSCALLS = "landlock_create_ruleset landlock_add_rule landlock_restrict_self"
BOOT_TIMEOUT = 60.0
COMMAND_TIMEOUT = 60.0

PLUGIN_MODULE = '''"""Handlers for the service tests: sd.sleep, sd.fail, sd.whoami."""

import os
import time
from pathlib import Path

from handlers.base import Handler, HandlerResult
from worker.errors import HandlerError


class ServiceTestHandler(Handler):
    name = "service-test"
    operations = ("sd.sleep", "sd.fail", "sd.whoami")
    payload_types = ()

    def execute(self, ctx, payload):
        if ctx.operation == "sd.fail":
            raise HandlerError("failed on purpose")
        if ctx.operation == "sd.sleep":
            (ctx.output_dir / f"{ctx.job_id}.started").write_text(str(os.getpid()))
            time.sleep(float(payload["seconds"]))
            return HandlerResult(data={"slept": payload["seconds"]})
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return HandlerResult(data={
            "uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid(),
            "no_new_privs": status["NoNewPrivs"].strip(), "seccomp": status["Seccomp"].strip(),
            "cap_eff": status["CapEff"].strip(), "cgroup": Path("/proc/self/cgroup").read_text(),
        })
'''


def poll(check: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Return check()'s first truthy value, asking every `interval` s; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Container:
    """A booted systemd in systemd-nspawn: run commands inside, reach its files from outside."""

    def __init__(self, root: Path, nspawn: subprocess.Popen[bytes], log: Path) -> None:
        self.root = root
        self.nspawn = nspawn
        self.log = log
        self.init_pid = 0  # the container's systemd, as the host numbers it

    def path(self, inside: Path | str) -> Path:
        """The host path of a path inside the container's root directory."""
        return self.root / str(inside).lstrip("/")

    def run(self, *argv: str, check: bool = True, timeout: float = COMMAND_TIMEOUT
            ) -> subprocess.CompletedProcess[str]:
        """Run argv in the container's namespaces; with `check`, fail on a non-zero exit."""
        done = subprocess.run(
            ["nsenter", "-t", str(self.init_pid), "-m", "-u", "-i", "-n", "-p", *argv],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
            env={**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"},
        )
        if check:
            assert done.returncode == 0, f"{argv}: rc {done.returncode}\n{done.stdout}{done.stderr}"
        return done

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`systemctl ARGS` inside the container."""
        return self.run("systemctl", *args, check=check)

    def show(self, *props: str) -> dict[str, str]:
        """The unit's properties, as `systemctl show -p` prints them."""
        out = self.systemctl("show", UNIT, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *matches: str) -> list[dict[str, Any]]:
        """Journal entries matching `matches` (FIELD=value), oldest first, as JSON objects."""
        out = self.run("journalctl", "--no-pager", "-o", "json", *matches).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def write_drop_in(self, name: str, text: str) -> None:
        """Write (or with empty text, remove) a drop-in of the unit, then daemon-reload."""
        path = self.path(DROP_INS / name)
        if text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        else:
            path.unlink(missing_ok=True)
        self.systemctl("daemon-reload")

    def boot(self) -> None:
        """Wait until the container's systemd has finished booting (or skip: nspawn cannot run)."""
        self.init_pid = poll(self._find_init, BOOT_TIMEOUT, "the container's systemd")
        bus = Path(f"/proc/{self.init_pid}/root/run/systemd/private")
        poll(lambda: self.nspawn.poll() is not None or bus.exists(), BOOT_TIMEOUT, "systemd's bus")
        if self.nspawn.poll() is not None:
            pytest.skip(f"systemd-nspawn cannot boot a container here: {self.log_tail()}")
        state = self.run("systemctl", "is-system-running", "--wait", check=False,
                         timeout=BOOT_TIMEOUT).stdout.strip()
        assert state in ("running", "degraded"), f"boot ended {state!r}:\n{self.log_tail()}"

    def _find_init(self) -> int | None:
        """The host pid of the container's PID 1, once it exists; skip if nspawn has exited."""
        if self.nspawn.poll() is not None:
            pytest.skip(f"systemd-nspawn cannot run here: {self.log_tail()}")
        try:
            children = psutil.Process(self.nspawn.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        for child in children:
            try:
                nspid = Path(f"/proc/{child.pid}/status").read_text().split("NSpid:")[1].split("\n")[0]
            except (OSError, IndexError):
                continue
            if nspid.split()[-1] == "1" and child.name() == "systemd":
                return child.pid
        return None

    def log_tail(self, lines: int = 15) -> str:
        """The end of nspawn's output (the container's console)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def shutdown(self) -> None:
        """Power the container off; kill it when it does not stop within 30 s."""
        if self.nspawn.poll() is None and self.init_pid:
            self.run("systemctl", "poweroff", check=False)
        try:
            self.nspawn.wait(30)
        except subprocess.TimeoutExpired:
            for pid in (self.init_pid, self.nspawn.pid):
                if pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            self.nspawn.wait(10)


def _skip_unless_nspawn_can_run() -> None:
    """Skip the module where nspawn cannot run at all: not root, or the tools are missing."""
    if os.geteuid() != 0:
        pytest.skip("systemd-nspawn needs root")
    for tool in ("systemd-nspawn", "nsenter", "systemd-sysusers", "systemd-tmpfiles"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian packages systemd-container, systemd)")


def make_root(root: Path) -> None:
    """A minimal root: a copy of /etc (with its own os-release), /usr to be bound from the host."""
    shutil.copytree("/etc", root / "etc", symlinks=True)
    (root / "etc" / "os-release").unlink(missing_ok=True)
    shutil.copy("/usr/lib/os-release", root / "etc" / "os-release")
    for wants in (root / "etc" / "systemd" / "system").glob("*.wants"):
        shutil.rmtree(wants)  # the host's enabled services (databases, timers) stay off
    for d in ("usr", "var", "tmp", "root", "opt"):
        (root / d).mkdir(exist_ok=True)
    for d in ("bin", "lib", "lib64", "sbin"):
        if Path("/usr", d).exists():
            (root / d).symlink_to(f"usr/{d}")


def install_unit(root: Path) -> None:
    """Install the units with scripts/install-unit.sh into /etc of the root (its /usr is the host's)."""
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "install-unit.sh"), "--root", str(root), "--prefix", "/etc",
         "--bin", str(Path(sys.prefix) / "bin" / "guestkit-worker")],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def write_plugin(root: Path) -> None:
    """A handler plugin found through its entry point: a dist-info dir and a module."""
    plugin = root / str(PLUGIN_DIR).lstrip("/")
    dist = plugin / "gkw_service_test-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gkw-service-test\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[guestkit_worker.handlers]\nservice_test = gkw_service_test:ServiceTestHandler\n")
    (plugin / "gkw_service_test.py").write_text(PLUGIN_MODULE)
    drop_in = root / str(DROP_INS).lstrip("/") / "20-test-plugin.conf"
    drop_in.parent.mkdir(parents=True, exist_ok=True)
    drop_in.write_text(f"[Service]\nEnvironment=PYTHONPATH={PLUGIN_DIR}\n")


def read_only_binds() -> list[str]:
    """--bind-ro for /usr, the checkout, the venv and the interpreter's installation (same paths)."""
    paths = {Path("/usr"), REPO, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    keep = sorted(p for p in paths if not any(q != p and q in p.parents for q in paths))
    return [f"--bind-ro={p}" for p in keep]


@pytest.fixture(scope="module")
def ctr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """A booted container with the unit installed (not yet started); powered off afterwards."""
    _skip_unless_nspawn_can_run()
    base = tmp_path_factory.mktemp("nspawn")
    root = base / "root"
    make_root(root)
    install_unit(root)
    write_plugin(root)
    log = base / "nspawn.log"
    with open(log, "wb") as out:
        nspawn = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--private-network",
             f"--machine=gkw-test-{os.getpid()}", f"--directory={root}", *read_only_binds(),
             f"--system-call-filter={LANDLOCK_SYSCALLS}", "--boot"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            env={**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"},
        )
    container = Container(root, nspawn, log)
    try:
        container.boot()
        # Enabled, as operators install it: the unit stays loaded when stopped, so its exit
        # status can still be read after `systemctl stop`.
        container.systemctl("enable", UNIT)
        yield container
    finally:
        container.shutdown()


# -- helpers on the running service ------------------------------------------------------------


def ensure_active(ctr: Container) -> dict[str, str]:
    """Start the service unless it runs; return its MainPID and ActiveState."""
    props = ctr.show("ActiveState", "MainPID")
    if props["ActiveState"] != "active":
        ctr.systemctl("reset-failed", UNIT, check=False)
        ctr.systemctl("start", UNIT)
        props = ctr.show("ActiveState", "MainPID")
    assert props["ActiveState"] == "active", props
    return props


def drop(ctr: Container, doc: dict[str, Any]) -> None:
    """Put a job into the service's inbox from the host: write aside, then rename (atomic)."""
    tmp = ctr.path(STATE / f".drop-{doc['job_id']}")
    tmp.write_bytes(orjson.dumps(doc))
    os.rename(tmp, ctr.path(STATE / "jobs" / f"{doc['job_id']}.json"))


def result(ctr: Container, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """The job's result document, waiting for it to appear."""
    path = ctr.path(STATE / "results" / f"{job_id}-result.json")
    return wait_until(lambda: path.exists() and orjson.loads(path.read_bytes()),
                      [path.parent], timeout, f"the result of {job_id}")


def job_user(ctr: Container) -> int:
    """The uid of the guestkit user that install-unit.sh's sysusers.d snippet created."""
    for line in ctr.path("/etc/passwd").read_text().splitlines():
        name, _, uid, *_ = line.split(":")
        if name == "guestkit":
            return int(uid)
    raise AssertionError("no guestkit user in the container")


def job_group(ctr: Container) -> int:
    """The gid of the guestkit group (the job user's own group)."""
    for line in ctr.path("/etc/group").read_text().splitlines():
        name, _, gid, *_ = line.split(":")
        if name == "guestkit":
            return int(gid)
    raise AssertionError("no guestkit group in the container")


# -- the tests -------------------------------------------------------------------------------


def test_start_returns_after_ready_with_the_spool_recovered(ctr: Container) -> None:
    """`systemctl start` (Type=notify) returns once READY=1 came: active, STATUS= set, spool made."""
    jobs = ctr.path(STATE / "jobs")
    shutil.rmtree(jobs)  # the supervisor must make the whole spool before READY
    jobs.mkdir(mode=0o700)
    drop(ctr, job("before-start"))

    ctr.systemctl("start", UNIT)
    props = ctr.show("ActiveState", "SubState", "StatusText", "MainPID", "Type", "NotifyAccess")
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert props["Type"] == "notify" and props["NotifyAccess"] == "main", props
    assert re.fullmatch(r"running \d+/4, queued \d+", props["StatusText"]), props
    for d in (".active", ".retry", ".status", ".cancel", "done", "failed", "rejected"):
        assert (jobs / d).is_dir(), d
    assert (jobs / ".lock").read_text().strip() == props["MainPID"]
    assert result(ctr, "before-start")["status"] == "completed"


def test_jobs_dropped_into_the_spool_complete_in_their_sandbox(ctr: Container) -> None:
    """Jobs complete, and each job gets every sandbox layer under the unit's hardening."""
    ensure_active(ctr)
    ids = [f"echo-{n}" for n in range(5)]
    for job_id in ids:
        drop(ctr, job(job_id))
    drop(ctr, job("whoami", "sd.whoami"))
    for job_id in ids:
        done = result(ctr, job_id)
        assert done["status"] == "completed" and done["data"]["echo"] == {"n": job_id}, done.get("error")

    probe = result(ctr, "whoami")
    assert probe["status"] == "completed", probe
    said = " ".join(str(e.get("MESSAGE")) for e in ctr.journal("-u", UNIT))
    assert "died while boxing" not in said and "ended while waiting" not in said  # spares work
    uid = job_user(ctr)
    want = {"session", "pdeathsig", "pid-namespace", "network-namespace", "rlimits", "closed-fds",
            "scrubbed-environment", f"user:{uid}", "no-new-privs", "seccomp"}
    if Path(f"/proc/{ctr.init_pid}/root/sys/fs/cgroup/cgroup.controllers").exists():
        want.add("cgroup-v2-kill")  # the container runs cgroup v2: the unit's Delegate=yes
    if landlock.abi():
        want.add(f"landlock-abi{landlock.abi()}")
    assert want <= set(probe["isolation"]), probe["isolation"]
    seen = probe["data"]
    assert (seen["uid"], seen["gid"]) == (uid, job_group(ctr))
    assert (seen["no_new_privs"], seen["seccomp"], seen["cap_eff"]) == ("1", "2", "0000000000000000")
    assert seen["pid"] <= 2  # the job's own PID namespace
    if "cgroup-v2-kill" in want:
        assert re.search(rf"0::/system.slice/{re.escape(UNIT)}/(job|slot)-", seen["cgroup"]), \
            seen["cgroup"]


def test_journal_has_each_jobs_lines_with_fields_and_priorities(ctr: Container) -> None:
    """`journalctl GUESTKIT_JOB_ID=<id>` returns that job's story, info at 6, a failure at 4."""
    ensure_active(ctr)
    drop(ctr, job("journal-ok"))
    drop(ctr, job("journal-bad", "sd.fail"))
    assert result(ctr, "journal-ok")["status"] == "completed"
    assert result(ctr, "journal-bad")["status"] == "failed"
    hostname = ctr.path("/etc/hostname").read_text().strip()

    def story(job_id: str, last: str) -> list[dict[str, Any]]:
        def told() -> list[dict[str, Any]]:
            entries = ctr.journal(f"GUESTKIT_JOB_ID={job_id}")
            return entries if any(e.get("GUESTKIT_STATE") == last for e in entries) else []
        return poll(told, 20, f"{job_id}'s '{last}' line in the journal")

    ok = story("journal-ok", "completed")
    assert [e["GUESTKIT_STATE"] for e in ok][:2] == ["queued", "running"], ok
    for entry in ok:
        assert entry["PRIORITY"] == "6", entry
        assert entry["GUESTKIT_OPERATION"] == "system.echo" and entry["GUESTKIT_ATTEMPT"] == "1"
        assert entry["GUESTKIT_WORKER_ID"] == hostname and entry["_SYSTEMD_UNIT"] == UNIT
        assert entry["SYSLOG_IDENTIFIER"] == "guestkit-worker"
    assert ok[-1]["MESSAGE"] == "[journal-ok] completed"

    bad = story("journal-bad", "failed")
    assert all(e["GUESTKIT_OPERATION"] == "sd.fail" for e in bad)
    assert [(e["GUESTKIT_STATE"], e["PRIORITY"]) for e in bad if e["PRIORITY"] != "6"] == [
        ("failed", "4")]
    assert "failed on purpose" in bad[-1]["MESSAGE"]


def test_health_answers_inside_the_containers_network(ctr: Container) -> None:
    """`guestkit-worker health` reaches /healthz and /readyz on 127.0.0.1:9464 inside."""
    ensure_active(ctr)
    done = ctr.run(str(Path(sys.prefix) / "bin" / "guestkit-worker"), "health")
    assert "healthz: 200" in done.stdout and "readyz: 200" in done.stdout, done.stdout


def test_stop_drains_running_jobs_and_ends_with_success(ctr: Container) -> None:
    """`systemctl stop` while jobs run: they complete, then Result=success, exit status 0."""
    running = ensure_active(ctr)
    invocation = ctr.show("InvocationID")["InvocationID"]
    ids = ["drain-1", "drain-2"]
    for job_id in ids:
        drop(ctr, job(job_id, "sd.sleep", {"seconds": 3}))
    started = [ctr.path(STATE / "outputs" / f"{job_id}.started") for job_id in ids]
    wait_until(lambda: all(p.exists() for p in started), [started[0].parent], 30, "both jobs to run")
    results = [ctr.path(STATE / "results" / f"{job_id}-result.json") for job_id in ids]
    assert not any(p.exists() for p in results)

    ctr.systemctl("stop", UNIT)
    for job_id in ids:
        done = result(ctr, job_id, timeout=1)
        assert done["status"] == "completed" and done["data"] == {"slept": 3}, done
    props = ctr.show("ActiveState", "Result", "ExecMainPID", "ExecMainCode", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainPID": running["MainPID"],
                     "ExecMainCode": "1", "ExecMainStatus": "0"}, props  # code 1: CLD_EXITED
    said = [e["MESSAGE"] for e in ctr.journal(f"_SYSTEMD_INVOCATION_ID={invocation}")]
    assert any("draining" in m for m in said), said


def test_hung_loop_is_killed_by_the_watchdog_and_restarted(ctr: Container) -> None:
    """A supervisor that stops pinging (SIGSTOP) is aborted by WatchdogSec= and started again."""
    ctr.write_drop_in("50-watchdog.conf", "[Service]\nWatchdogSec=3\n")
    try:
        ctr.systemctl("reset-failed", UNIT, check=False)
        ctr.systemctl("restart", UNIT)
        before = ctr.show("MainPID", "NRestarts", "InvocationID", "WatchdogUSec",
                          "WatchdogTimestampMonotonic")
        assert before["WatchdogUSec"] == "3s", before
        poll(lambda: ctr.show("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
             != before["WatchdogTimestampMonotonic"], 10, "a watchdog ping from the loop")

        ctr.run("kill", "-STOP", before["MainPID"])

        def restarted() -> dict[str, str] | None:
            props = ctr.show("ActiveState", "MainPID", "NRestarts")
            fresh = props["MainPID"] not in ("0", before["MainPID"])
            return props if props["ActiveState"] == "active" and fresh else None

        after = poll(restarted, 30, "the service to be restarted")
        assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1, (before, after)
        killed = ctr.journal(f"INVOCATION_ID={before['InvocationID']}", f"UNIT={UNIT}")
        messages = [e["MESSAGE"] for e in killed]
        assert any("Watchdog timeout" in m for m in messages), messages
        assert [e["UNIT_RESULT"] for e in killed if "UNIT_RESULT" in e] == ["watchdog"], messages
    finally:
        ctr.write_drop_in("50-watchdog.conf", "")
