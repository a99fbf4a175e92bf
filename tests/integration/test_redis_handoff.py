"""Redis: a job the worker that read it cannot take goes to a live worker that can (PROTOCOL §1)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from conftest import job, wait_until
from redis_fixtures import (
    GROUP,
    PREFIX,
    STREAM,
    blocked_reads,
    executions,
    lease_env,
    poll_until,
    redis_server_fixture,  # noqa: F401  (the redis_server fixture)
    redis_workers_fixture,  # noqa: F401  (the redis_workers fixture)
    settled,
    shared_results,
    xadd_jobs,
)

from worker import metrics
from worker.transports.redis import fingerprint

#: short leases: a worker reads the others' profiles every second
FAST = lease_env(claim_idle=4, renew=1)
#: a worker reads the others' profiles as it connects, then every 20 s; no takeover in a test
SLOW = lease_env(claim_idle=60, renew=20)


def _needs_gpu(job_id: str) -> dict[str, Any]:
    doc = job(job_id, "test.sleep", {"seconds": 0.1})
    doc["constraints"] = {"required_features": ["gpu-x"]}
    return doc


def _status(r: Any, job_id: str) -> dict[str, Any]:
    raw = r.get(f"{PREFIX}:status:{job_id}")
    return orjson.loads(raw) if raw else {}


def _holders(r: Any) -> dict[str, int]:
    """How many messages each worker holds."""
    consumers = r.xpending(STREAM, GROUP)["consumers"]
    return {c["name"].decode(): c["pending"] for c in consumers}


def _waits_on(r: Any, job_id: str, worker: str, why_ends: str) -> None:
    """Wait until `job_id` waits on `worker`, which holds its message, for a reason ending so."""
    status = poll_until(lambda: (s := _status(r, job_id)).get("waiting_for") and s, 30,
                        f"{job_id} to wait on {worker}")
    assert status["worker_id"] == worker and _holders(r) == {worker: 1}
    assert status["waiting_for"].endswith(why_ends)


def _passed_on(w: Any) -> str:
    """The lines of guestkit_worker_passed_on_total that worker `w` (with --metrics-addr) shows."""
    _, body = metrics.fetch("127.0.0.1", w.metrics_port(), "/metrics")
    return "".join(line + "\n" for line in body.decode().splitlines()
                   if line.startswith("guestkit_worker_passed_on_total{"))


def _peers(r: Any) -> set[str]:
    return {w.decode() for w in r.zrange(f"{PREFIX}:workers:default", 0, -1)}


def _busy_able(r: Any, redis_workers: Any, seconds: float, env: dict[str, str]) -> Any:
    """Start worker "able" (feature gpu-x, one slot) and keep it busy `seconds`, reading
    nothing."""
    able = redis_workers("able", "--max-concurrent", "1", "--feature", "gpu-x", env=env).start()
    busy = job("keeps-able-busy", "test.sleep", {"seconds": seconds})
    busy["routing"] = {"worker_id": "able"}
    xadd_jobs(r, [busy])
    poll_until(lambda: _status(r, "keeps-able-busy").get("state") == "running", 30,
               "the worker with the feature to be busy")
    # the read asked for while its slot was free ends after BLOCK_MS; none follows it
    poll_until(lambda: blocked_reads(r) == 0, 30, "the busy worker to stop reading")
    return able


def _hand_to_able(r: Any, redis_workers: Any, job_id: str) -> Any:
    """Start worker "plain" (it reads able's profile as it connects), put a job only able can
    take on the stream, and return plain once it handed the job to able."""
    plain = redis_workers("plain", "--metrics-addr", "127.0.0.1:0", env=SLOW).start()
    xadd_jobs(r, [_needs_gpu(job_id)])
    handed = poll_until(lambda: (s := _status(r, job_id)).get("handed_by") == "plain" and s, 30,
                        "the worker without the feature to hand the job on")
    assert handed["worker_id"] == "able" and handed["state"] == "queued"
    assert "required_features" in handed["detail"]
    return plain


@pytest.mark.timeout(120)
def test_a_job_read_by_a_worker_that_cannot_take_it_goes_straight_to_one_that_can(
        redis_server, redis_workers) -> None:
    r = redis_server.client()
    able = _busy_able(r, redis_workers, 30, lease_env(claim_idle=120, renew=60))
    plain = _hand_to_able(r, redis_workers, "gpu-job-1")
    # able takes it as it is told, not at its next renewal (60 s on): while still busy
    wait_until(lambda: "handed to this worker" in able.log() or
               "[keeps-able-busy] completed" in able.log(), [able.base], 40, "able to take it")
    log = able.log()
    assert "handed to this worker" in log and "[keeps-able-busy] completed" not in log
    r.set(f"{PREFIX}:cancel:keeps-able-busy", "now")  # no need to wait for it any longer
    r.publish(f"{PREFIX}:cancel", "keeps-able-busy")
    shown = r.hget(f"{PREFIX}:profiles:default", "plain")
    assert _passed_on(plain) == 'guestkit_worker_passed_on_total{to="worker"} 1\n'
    assert plain.stop() == 0  # the job is able's now: plain gives nothing back
    poll_until(lambda: settled(r) and len(shared_results(r)) == 2, 30, "both jobs to end")
    assert shared_results(r)["gpu-job-1"]["worker_id"] == "able"
    assert executions([able, plain]) == {"keeps-able-busy": 1, "gpu-job-1": 1}
    log = plain.log()
    assert "handed to worker able" in log and "waiting:" not in log  # never held back here
    assert "went back to the stream" not in log
    assert plain.result("gpu-job-1") is None
    assert not any((plain.jobs / ".active").iterdir())  # no local copy left behind
    assert not (plain.jobs / ".status" / "gpu-job-1.json").exists()
    assert r.smembers(f"{PREFIX}:declined:gpu-job-1") == {f"plain {fingerprint(shown)}".encode()}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_worker_that_drains_gives_back_a_job_handed_to_it_that_it_never_started(
        redis_server, redis_workers) -> None:
    r = redis_server.client()
    able = _busy_able(r, redis_workers, 8, SLOW)
    plain = _hand_to_able(r, redis_workers, "gpu-job-6")
    assert able.stop() == 0  # its busy job ends first; the handed one never started
    assert "job gpu-job-6 went back to the stream unstarted" in able.log()
    _waits_on(r, "gpu-job-6", "plain", "(worker 'able' has stopped)")
    assert executions([able, plain]) == {"keeps-able-busy": 1}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_job_no_live_worker_can_take_says_why_and_goes_to_a_worker_that_joins(
        redis_server, redis_workers) -> None:
    r = redis_server.client()
    first = redis_workers("first", env=FAST).start()
    second = redis_workers("second", env=FAST).start()
    poll_until(lambda: _peers(r) == {"first", "second"}, 30, "both workers to show their profiles")
    xadd_jobs(r, [_needs_gpu("gpu-job-2")])
    why = poll_until(lambda: "either" in (s := _status(r, "gpu-job-2")).get("waiting_for", "")
                     and s, 30, "the status to say why no worker takes it")
    holder = why["worker_id"]
    other = ({"first", "second"} - {holder}).pop()
    assert why["waiting_for"] == (
        f"constraints.required_features: this worker lacks ['gpu-x']; no other live worker can "
        f"take it either (constraints.required_features: worker '{other}' lacks ['gpu-x'])")
    late = redis_workers("late", "--feature", "gpu-x", env=FAST).start()
    poll_until(lambda: settled(r) and shared_results(r), 30, "the job to run on the late worker")
    assert shared_results(r)["gpu-job-2"]["worker_id"] == "late"
    assert executions([first, second, late]) == {"gpu-job-2": 1}
    holder_worker = first if holder == "first" else second
    assert "handed to worker late" in holder_worker.log()
    assert holder_worker.result("gpu-job-2") is None


def _show(r: Any, profile: dict[str, Any]) -> bytes:
    """Make `profile` a live worker's, as the worker would show it; return its bytes."""
    raw = orjson.dumps(profile)
    r.zadd(f"{PREFIX}:workers:default", {profile["worker_id"]: 2**50})
    r.hset(f"{PREFIX}:profiles:default", profile["worker_id"], raw)
    return raw


@pytest.mark.timeout(120)
def test_a_job_never_goes_back_to_a_worker_that_handed_it_on_unless_set_up_anew(
        redis_server, redis_workers) -> None:
    r = redis_server.client()
    # a worker that would fit, but handed this job on before (as it is set up now)
    ghost = {"worker_id": "ghost", "pool": "default", "privileged": False,
             "labels": {"host": "elsewhere", "worker_id": "ghost", "pool": "default"},
             "capabilities": ["test.sleep"], "features": ["gpu-x"], "version": "9.9.9"}
    r.sadd(f"{PREFIX}:declined:gpu-job-3", f"ghost {fingerprint(_show(r, ghost))}")
    plain = redis_workers("plain", env=FAST).start()
    xadd_jobs(r, [_needs_gpu("gpu-job-3")])
    _waits_on(r, "gpu-job-3", "plain", "(worker 'ghost' handed it on before)")
    _show(r, {**ghost, "version": "9.9.10"})  # set up anew: it may take the job now
    poll_until(lambda: _status(r, "gpu-job-3").get("handed_by") == "plain", 30,
               "the job to go to the worker set up anew")
    assert _holders(r) == {"ghost": 1}
    assert plain.stop() == 0
    assert "plain" not in _peers(r)  # a stopped worker is no longer offered jobs


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_waiting_job_a_worker_recovers_after_kill_9_still_goes_to_one_that_can(
        redis_server, redis_workers) -> None:
    r = redis_server.client()
    no_takeover = lease_env(claim_idle=60, renew=1)  # within the test only recovery can move it
    plain = redis_workers("plain", env=no_takeover).start()
    xadd_jobs(r, [_needs_gpu("gpu-job-4")])
    _waits_on(r, "gpu-job-4", "plain", "lacks ['gpu-x']")
    plain.kill()
    able = redis_workers("able", "--feature", "gpu-x", env=no_takeover).start()
    plain.start()  # its spool brings the job back; its message is still plain's
    poll_until(lambda: settled(r) and shared_results(r), 30, "the job to run on the able worker")
    assert shared_results(r)["gpu-job-4"]["worker_id"] == "able"
    assert executions([plain, able]) == {"gpu-job-4": 1}
    assert "handed to worker able" in plain.log()
    assert not any((plain.jobs / ".active").iterdir())


@pytest.mark.timeout(120)
def test_a_job_is_not_handed_to_a_worker_that_has_just_stopped(redis_server, redis_workers) -> None:
    r = redis_server.client()
    able = redis_workers("able", "--feature", "gpu-x", env=SLOW).start()
    plain = redis_workers("plain", env=SLOW).start()  # reads able's profile as it connects
    assert _peers(r) == {"able", "plain"}
    assert able.stop() == 0  # withdraws its profile; plain has not read the others since
    assert _peers(r) == {"plain"}
    xadd_jobs(r, [_needs_gpu("gpu-job-5")])
    _waits_on(r, "gpu-job-5", "plain", "(worker 'able' has stopped)")
    assert "handed to worker" not in plain.log()


@pytest.mark.timeout(120)
def test_a_job_routed_to_another_pool_moves_to_that_pools_stream(
        redis_server, redis_workers, tmp_path) -> None:
    r = redis_server.client()
    here = redis_workers("here", "--metrics-addr", "127.0.0.1:0", env=FAST).start()
    images = tmp_path / "gpu-images"  # only the gpu pool may read them
    images.mkdir()
    (images / "disk.raw").write_bytes(bytes(1 << 20))
    there = redis_workers("there", "--pool", "gpu", "--image-root", str(images), env=FAST).start()
    doc = job("pool-job-1", "test.sleep", {"seconds": 0.1})
    doc["routing"] = {"worker_pool": "gpu"}
    inspect = job("pool-job-2", "guestkit.inspect", {"image": {"path": str(images / "disk.raw")}})
    inspect["routing"] = {"worker_pool": "gpu"}
    xadd_jobs(r, [doc, inspect])  # on the default pool's stream
    poll_until(lambda: len(shared_results(r)) == 2, 60, "the jobs to run in pool gpu")
    assert {j: d["worker_id"] for j, d in shared_results(r).items()} == {
        "pool-job-1": "there", "pool-job-2": "there"}  # not judged by here's image roots
    assert executions([here, there]) == {"pool-job-1": 1}
    assert here.log().count("moved to the queue of pool gpu") == 2
    assert _passed_on(here) == 'guestkit_worker_passed_on_total{to="pool"} 2\n'
    nobody = job("pool-job-3")
    nobody["routing"] = {"worker_pool": "nobody"}  # a pool no worker serves yet
    xadd_jobs(r, [nobody])
    moved = poll_until(lambda: (s := _status(r, "pool-job-3")).get("moved_by") and s, 30,
                       "the job to move to pool nobody")
    assert moved["state"] == "pending" and moved["stream"] == f"{PREFIX}:jobs:nobody"  # unread
    assert r.xlen(f"{PREFIX}:jobs:nobody") == 1
    poll_until(lambda: settled(r, f"{PREFIX}:jobs:gpu"), 30, "the gpu pool's entry to be acked")
    assert settled(r) and not any((here.jobs / ".active").iterdir())


@pytest.mark.timeout(120)
def test_a_killed_workers_profile_lapses_while_a_live_ones_is_renewed(
        redis_server, redis_workers) -> None:
    r = redis_server.client()
    workers = f"{PREFIX}:workers:default"
    stays = redis_workers("stays", env=FAST).start()  # profiles shown for 3 s, renewed every 1 s
    dies = redis_workers("dies", env=FAST).start()
    poll_until(lambda: _peers(r) == {"stays", "dies"}, 30, "both workers to show their profiles")
    shown_until = r.zscore(workers, "stays")
    dies.kill()  # no withdrawal: its profile must lapse on its own
    poll_until(lambda: _peers(r) == {"stays"}, 30, "the killed worker's profile to lapse")
    assert not r.hexists(f"{PREFIX}:profiles:default", "dies")
    assert r.zscore(workers, "stays") > shown_until  # renewed meanwhile
    assert stays.stop() == 0 and _peers(r) == set()
