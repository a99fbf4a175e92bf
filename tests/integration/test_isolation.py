"""Untrusted jobs stay in their box. Each test names the host feature it needs."""

from __future__ import annotations

import ast
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
from conftest import (
    Worker,
    idle_spares,
    job,
    spool_cgroups,
    wait_gone,
    wait_until,
)

from worker import cgroups, landlock

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: jobs drop to another user")


def _probe(w: Worker, job_id: str, actions: list, **data) -> list[str]:
    w.drop(job(job_id, "test.probe", {"actions": actions, **data}))
    res = w.wait_result(job_id)
    assert res["status"] == "completed", res
    return res["data"]["outcomes"]


def _hierarchies() -> cgroups.Hierarchies:
    return cgroups.probe("guestkit-feature-probe")


@pytest.mark.skipif(not _hierarchies().has_pids(), reason="needs a pids cgroup controller")
def test_a_fork_bomb_is_contained_by_the_pids_limit(make_worker) -> None:
    w = make_worker("--kill-grace", "1").start()
    doc = job("bomb", "test.probe", {"actions": [["forkbomb", 500]]}, limits={"max_processes": 20})
    w.drop(doc)
    w.drop(job("bystander", "test.sleep", {"seconds": 0.5}))
    res = w.wait_result("bomb")
    made = int(res["data"]["outcomes"][0].split()[1])
    assert made < 20
    assert "cgroup-v1-pids" in res["isolation"] or "cgroup-v2-pids" in res["isolation"]
    assert w.wait_result("bystander")["status"] == "completed"


@pytest.mark.skipif(not _hierarchies().has_memory(), reason="needs a memory cgroup controller")
def test_a_job_over_its_cgroup_memory_ends_as_memory_limit_with_its_peak(make_worker) -> None:
    w = make_worker("--memory-limit-mb", "128").start()
    w.drop(job("hog", "test.alloc", {"mb": 1024}))
    res = w.wait_result("hog")
    assert res["error"]["code"] == "MEMORY_LIMIT"
    assert "OOM killer" in res["error"]["message"]
    assert 100 <= res["metrics"]["peak_memory_mb"] <= 129


@ROOT_ONLY
def test_the_job_user_cannot_read_root_files_regain_root_or_use_setuid_binaries(
        make_worker, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    suid = tmp_path / "suid-id"
    shutil.copy("/usr/bin/id", suid)
    suid.chmod(0o4755)
    w = make_worker("--isolation", "user", "--isolation", "cgroup").start()
    out = _probe(w, "priv", [["read", str(secret)], ["setuid0", None], ["run", [str(suid), "-u"]],
                             ["whoami", None]])
    assert out[0] == "PermissionError: errno 13"
    assert out[1] == "PermissionError: errno 1"
    assert out[2] == "ok 65534"  # the setuid bit is ignored under NO_NEW_PRIVS
    assert out[3].startswith("ok uid=65534 euid=65534")


@ROOT_ONLY
def test_without_network_a_job_cannot_reach_host_loopback(make_worker) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    w = make_worker().start()
    try:
        out = _probe(w, "net", [["connect", {"host": "127.0.0.1", "port": port}]])
    finally:
        listener.close()
    assert out[0] == "OSError: errno 101"  # network unreachable: only a down lo exists
    assert "network-namespace" in w.result("net")["isolation"]


@pytest.mark.skipif(landlock.abi() < 1, reason="needs Landlock in the kernel")
def test_with_landlock_a_job_writes_only_its_dirs_and_reads_only_allowed_paths(
        make_worker, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    outside.chmod(0o777)
    (outside / "data").write_text("private")
    (outside / "data").chmod(0o644)
    allowed = tmp_path / "image.raw"
    allowed.write_text("disk")
    allowed.chmod(0o644)
    w = make_worker().start()
    out = _probe(w, "ll", [["write", str(outside / "new")], ["read", str(outside / "data")],
                           ["read", str(allowed)], ["write", "scratch.txt"]],
                 inputs=[str(allowed)])
    assert out == ["PermissionError: errno 13", "PermissionError: errno 13", "ok 4", "ok 1"]
    assert not (outside / "new").exists()
    assert any(x.startswith("landlock-abi") for x in w.result("ll")["isolation"])


def test_a_forbidden_syscall_fails_and_ptrace_kills_the_job(make_worker) -> None:
    pytest.importorskip("pyseccomp", reason="needs libseccomp through pyseccomp")
    w = make_worker().start()
    out = _probe(w, "sc", [["syscall", "unshare"], ["syscall", "keyctl"]])
    assert out == ["PermissionError: errno 1", "PermissionError: errno 1"]
    w.drop(job("tracer", "test.probe", {"actions": [["syscall", "ptrace"]]}))
    res = w.wait_result("tracer")
    assert res["error"]["code"] == "KILLED"
    assert "seccomp" in res["error"]["message"] and "SIGSYS" in res["error"]["message"]


@ROOT_ONLY
def test_kill_9_of_the_supervisor_takes_every_job_process_with_it(make_worker) -> None:
    w = make_worker().start()
    pidfile = w.outputs / "escaper.pid"
    w.drop(job("victim", "test.probe", {"actions": [["daemon", str(pidfile)]], "then_sleep": True}))
    escaper = wait_until(lambda: pidfile.exists() and pidfile.read_text() and int(pidfile.read_text()),
                         [w.outputs], 20, "the job to daemonise a grandchild")
    job_pids = [c.pid for c in w.children()] + [escaper]
    assert all(os.stat(f"/proc/{p}").st_uid == 65534 for p in job_pids[1:])  # after the drop
    w.kill()
    wait_gone(job_pids, 10, "every job process to die")


def test_a_daemonised_grandchild_dies_when_its_job_ends(worker: Worker) -> None:
    pidfile = worker.outputs / "left.pid"
    out = _probe(worker, "leaver", [["daemon", str(pidfile)]])
    escaper = int(out[0].split()[1])
    wait_gone([int(pidfile.read_text())], 10, "the daemonised grandchild to die")
    assert escaper > 0


def test_capabilities_report_the_host_layers_and_results_the_applied_ones(worker: Worker) -> None:
    caps = orjson.loads(worker.cli("capabilities").stdout)
    assert {"session", "rlimits", "no-new-privs"} <= set(caps["isolation"])
    worker.drop(job("layers"))
    applied = worker.wait_result("layers")["isolation"]
    assert {"session", "pdeathsig", "rlimits", "no-new-privs"} <= set(applied)
    assert set(applied) - {"pid-namespace"} <= set(caps["isolation"]) | {"pid-namespace"}


def test_a_job_may_ask_for_less_than_the_cap_never_more(make_worker) -> None:
    w = make_worker("--memory-limit-mb", "512").start()
    w.drop(job("modest", "test.probe", {"actions": []}, limits={"memory_mb": 256}))
    w.drop(job("greedy", "test.probe", {"actions": []}, limits={"memory_mb": 100000}))
    assert w.wait_result("modest")["limits"]["memory_mb"] == 256
    assert w.wait_result("greedy")["limits"]["memory_mb"] == 512


@pytest.mark.skipif(not _hierarchies().has_memory(), reason="needs a memory cgroup controller")
def test_a_cgroup_reused_after_a_lower_limit_takes_a_higher_one(make_worker) -> None:
    """One slot: each job's cgroup held the last job's limits. On cgroup v1 the memory
    limit may never exceed memory+swap's, so raising it must raise that one first."""
    w = make_worker("--max-concurrent", "1", "--memory-limit-mb", "512").start()
    w.drop(job("low", "test.probe", {"actions": []}, limits={"memory_mb": 128}))
    assert w.wait_result("low")["limits"]["memory_mb"] == 128
    for i in range(4):
        w.drop(job(f"after-low-{i}"))
        res = w.wait_result(f"after-low-{i}")
        assert res["status"] == "completed", res["error"]
        assert res["limits"]["memory_mb"] == 512


@pytest.mark.skipif(not _hierarchies().layers, reason="needs a cgroup hierarchy")
def test_a_stale_slot_that_cannot_be_removed_yet_is_skipped() -> None:
    """A slot left by a crash is cleared before reuse; one that will not go yet (a child
    cgroup keeps it, as a dying process may for a moment) is passed over for the next."""
    h = cgroups.probe("guestkit-stale-slot-test")
    cgroups.sweep(h)
    stale = cgroups.JobCgroup.create(h, "slot-0")
    held = [d / "held" for d in stale.dirs]
    try:
        for d in held:
            d.mkdir()
        fresh = cgroups.Pool(h).take("next")
        assert fresh.dirs and all(d.name == "slot-1" for d in fresh.dirs)
        assert all(d.exists() for d in stale.dirs)
        for d in held:
            d.rmdir()
        again = cgroups.Pool(h).take("again")  # removable now: cleared and taken again
        assert again.dirs and all(d.name == "slot-0" for d in again.dirs)
    finally:
        for d in held:
            if d.exists():
                d.rmdir()
        cgroups.sweep(h)
    assert not any(d.exists() for d in stale.dirs)


def _burn(ms: int) -> None:
    """Use `ms` more milliseconds of this process's CPU."""
    end = time.process_time() + ms / 1000
    while time.process_time() < end:
        pass


@pytest.mark.skipif(not _hierarchies().layers, reason="needs a cgroup hierarchy")
def test_a_cgroup_counts_from_the_start_marked_while_its_spare_waited() -> None:
    h = cgroups.probe("guestkit-mark-start-test")
    cgroups.sweep(h)
    pool = cgroups.Pool(h)
    cg = pool.take("a")
    steps_r, steps_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a spare's life: boxing (CPU), waiting, then its job (CPU)
        cg.join()
        _burn(40)
        os.write(steps_w, b"1")
        os.read(go_r, 1)
        _burn(40)
        os.write(steps_w, b"2")
        os.read(go_r, 1)
        os._exit(0)
    try:
        assert os.read(steps_r, 1) == b"1"
        cg.mark_start()  # the spare waits, boxed
        os.write(go_w, b"g")
        assert os.read(steps_r, 1) == b"2"
        cg.limit(256, 64, mark_start=False)  # the hand-over: the start noted before stands
        if "cpu_usec" not in cg.stats():
            pytest.skip("no cpu.stat in this cgroup hierarchy")
        assert 30_000 <= cg.stats()["cpu_usec"] < 75_000  # the job's 40 ms, not the boxing
        os.write(go_w, b"g")
        os.waitpid(pid, 0)
        pid = 0
        pool.release(cg)
        again = pool.take("b")  # the same cgroup where a pool reuses them, else a new one
        assert again is cg or not pool.reusable
        again.limit(256, 64)  # a fresh fork's job: its start is marked now
        assert again.stats()["cpu_usec"] < 30_000  # counted from now, not from the last mark
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        cgroups.sweep(h)


@pytest.mark.skipif(not _hierarchies().layers, reason="needs a cgroup hierarchy")
def test_a_cgroup_reads_its_counters_through_files_kept_open_until_it_is_removed() -> None:
    h = cgroups.probe("guestkit-counters-test")
    cgroups.sweep(h)
    cg = cgroups.Pool(h).take("a")
    try:
        cg.mark_start()
        kept = dict(cg.counters)
        assert kept, "no counter file was read"
        for path, fd in kept.items():
            assert os.readlink(f"/proc/self/fd/{fd}") == path
        cg.stats()
        assert cg.empty()
        assert {p: fd for p, fd in cg.counters.items() if p in kept} == kept  # read again, not reopened
        opened = list(cg.counters.values())
        assert cg.remove()
        assert cg.counters == {}
        for fd in opened:
            with pytest.raises(OSError):
                os.fstat(fd)  # closed with the cgroup
    finally:
        cgroups.sweep(h)


@pytest.mark.skipif(not _hierarchies().layers, reason="needs a cgroup hierarchy")
def test_a_job_in_a_cgroup_ends_on_its_result_with_the_cgroups_accounting(make_worker) -> None:
    w = make_worker("--log-level", "debug").start()
    # 512 MiB still mapped at exit: tearing it down outlasts the result's hand-over
    out = _probe(w, "counted", [["print", "x" * 10], ["hold", 512]])
    assert out[1] == f"ok {512 << 20}"
    m = w.result("counted")["metrics"]
    assert m["cgroup"]["cpu_usec"] > 0
    assert m["cpu_seconds"] == round(m["cgroup"]["cpu_usec"] / 1e6, 3)  # the whole job's CPU
    if "memory_peak" in m["cgroup"]:
        assert m["peak_memory_mb"] == round(m["cgroup"]["memory_peak"] / (1 << 20), 2) >= 512
    assert (w.work / "counted" / "stdout.log").read_text() == "x" * 10 + "\n"
    pid = int(re.search(r"\[counted\] running: pid (\d+)", w.log()).group(1))
    wait_until(lambda: f"process {pid} exited after its job had ended on its result" in w.log(),
               [w.base], 20, "the job's process to be reaped after its result")


@pytest.mark.skipif(not spool_cgroups(Path("/any/jobs")),
                    reason="needs a cgroup hierarchy where a supervisor makes its own parent")
def test_a_stopped_supervisor_leaves_none_of_its_cgroups_behind(make_worker) -> None:
    w = make_worker().start()
    parents = list(spool_cgroups(w.jobs).values())
    # a job whose 256 MiB outlast its result: its process is still dying when the stop comes
    assert _probe(w, "lingers", [["hold", 256]]) == [f"ok {256 << 20}"]
    wait_until(lambda: idle_spares(w.proc.pid), [w.base], 20, "a spare to wait in its cgroup")
    assert all(list(p.glob("slot-*")) for p in parents), "the spare and the job had no cgroup"
    assert w.stop() == 0
    assert [p for p in parents if p.exists()] == []
    assert "still held by dying processes" not in w.log()


def test_a_log_planted_by_an_earlier_attempt_is_not_followed(make_worker) -> None:
    w = make_worker("--max-concurrent", "1", "--no-spares").start()
    w.drop(job("victim"))
    assert w.wait_result("victim")["status"] == "completed"
    victim = w.results / "victim-result.json"
    before = victim.read_bytes()
    w.drop(job("planter", "test.retry",
               {"succeed_on": 2, "say": True, "plant_log": str(victim)}, max_attempts=2))
    res = w.wait_result("planter")
    assert res["status"] == "completed" and res["data"]["attempt"] == 2
    assert victim.read_bytes() == before  # the retry, root until it drops, did not follow it
    log = w.work / "planter" / "stdout.log"
    assert not log.is_symlink() and log.read_text() == "attempt 2\n"


def test_a_job_without_network_has_no_unix_sockets_one_with_network_does(make_worker) -> None:
    """No AF_UNIX socket means no reaching another process's socket, so no fd handed over."""
    w = make_worker("--max-concurrent", "1", "--no-spares").start()
    w.drop(job("sealed", "test.probe", {"actions": [["listen_abstract", "gkw-x"],
                                                    ["connect_abstract", "gkw-x"],
                                                    ["unix_pair", None]]}))
    res = w.wait_result("sealed")
    assert res["data"]["outcomes"] == ["PermissionError: errno 1", "PermissionError: errno 1",
                                       "ok 1"]  # a socketpair stays within the job
    assert "no-unix-sockets" in res["isolation"]
    w.drop(job("networked", "test.net", {}))
    res = w.wait_result("networked")
    assert res["status"] == "completed" and "no-unix-sockets" not in res["isolation"]
    assert "no-unix-sockets" in w.cli("capabilities").stdout


def _idle_spares(w: Worker) -> list[int] | None:
    assert w.proc is not None
    return idle_spares(w.proc.pid) or None


def _probe_on(w: Worker, spares: bool, job_id: str, action: str, **execution: object) -> Any:
    """Run one probe `action` as `job_id`, on an idle spare or a fresh fork (checked), and
    give back what it returned."""
    waiting = wait_until(lambda: _idle_spares(w), [w.base, w.work], 20, "a spare") if spares else []
    w.drop(job(job_id, "test.probe", {"actions": [[action, None]]}, **execution))
    res = w.wait_result(job_id)
    assert res["status"] == "completed", res
    ran = re.findall(rf"\[{job_id}\] running: pid (\d+)", w.log())
    assert (int(ran[0]) in waiting) == spares, (ran, waiting)
    return ast.literal_eval(res["data"]["outcomes"][0].removeprefix("ok "))


@pytest.mark.parametrize("spares", [False, True], ids=["fresh-fork", "spare"])
def test_a_jobs_own_fork_runs_the_at_fork_hooks_that_its_zygote_skips(make_worker,
                                                                      spares: bool) -> None:
    w = make_worker("--max-concurrent", "1", "--log-level", "debug",
                    *([] if spares else ["--no-spares"])).start()
    skipped = r"gkw-forker \d+ ready: its children skip 2 at-fork hook"
    wait_until(lambda: re.search(skipped, w.log()), [w.base], 20, "the forker to be ready")
    # the child of a job that runs two threads knows it has one: threading's hook ran there
    assert _probe_on(w, spares, f"forks-{spares}", "threads_after_fork") == 1


@pytest.mark.parametrize("spares", [False, True], ids=["fresh-fork", "spare"])
def test_a_job_sees_only_its_own_environment_in_python_and_in_what_it_runs(
        make_worker, spares: bool) -> None:
    w = make_worker("--max-concurrent", "1", *([] if spares else ["--no-spares"]),
                    env={"LEAK_ME": "supervisor secret"}).start()
    for n, key in ((1, None), (2, "k-2")):  # the second job's environment must not hold the first's
        seen = _probe_on(w, spares, f"env-{n}", "env", **({"idempotency_key": key} if key else {}))
        workdir = str(w.work / f"env-{n}")
        want = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
                "GUESTKIT_JOB_ID": f"env-{n}", "GUESTKIT_OPERATION": "test.probe",
                "GUESTKIT_ATTEMPT": "1", **({"GUESTKIT_IDEMPOTENCY_KEY": key} if key else {})}
        assert seen["python"] == want
        assert seen["c"] == want


@pytest.mark.parametrize("spares", [False, True], ids=["fresh-fork", "spare"])
def test_a_job_holds_only_stdio_and_its_pipe_though_its_zygote_holds_more(
        make_worker, spares: bool) -> None:
    """The forker keeps fds open for every job (the Landlock read paths it anchored);
    none reaches the job."""
    w = make_worker("--max-concurrent", "1", "--log-level", "debug",
                    *([] if spares else ["--no-spares"])).start()
    assert w.proc is not None
    wait_until(lambda: re.search(r"gkw-forker \d+ ready:", w.log()), [w.base], 20,
               "the forker to be ready")  # ready: named, read paths anchored
    [forker] = [k for k in psutil.Process(w.proc.pid).children() if k.name() == "gkw-forker"]
    held = {os.readlink(f"/proc/{forker.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{forker.pid}/fd")}
    assert "/usr" in held or not landlock.abi(), held
    fds = _probe_on(w, spares, "fds", "fds")
    workdir = w.work / "fds"
    assert sorted(fds) == [0, 1, 2, 3], fds
    assert fds[0] == "/dev/null"
    assert (fds[1], fds[2]) == (str(workdir / "stdout.log"), str(workdir / "stderr.log"))
    assert fds[3].startswith("pipe:"), fds
