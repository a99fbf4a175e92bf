"""The Redis Streams transport against a real redis-server and real supervisors (DESIGN §8)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import orjson
import pytest
from conftest import Worker, job, wait_until
from redis_fixtures import (
    DEAD,
    GROUP,
    STREAM,
    RedisServer,
    blocked_reads,
    executions,
    free_port,
    lease_env,
    local_results,
    poll_until,
    redis_server_fixture,  # noqa: F401  (the redis_server fixture)
    redis_workers_fixture,  # noqa: F401  (the redis_workers fixture)
    settled,
    shared_results,
    xadd_jobs,
)

from worker import metrics


def _dead_letters(server: RedisServer) -> list[dict[str, str]]:
    rows = server.client().xrange(DEAD)
    return [{k.decode(): v.decode(errors="replace") for k, v in fields.items()} for _, fields in rows]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_three_supervisors_share_3000_jobs_with_one_result_each(redis_server, redis_workers) -> None:
    workers = [redis_workers(f"w{i}", "--max-concurrent", "4").start() for i in range(3)]
    r = redis_server.client()
    ids = [f"share-{i:05d}" for i in range(3000)]
    started = time.monotonic()
    xadd_jobs(r, [job(i, data={"message": i}) for i in ids])
    poll_until(lambda: settled(r), 300, "every message to be acknowledged", every=0.2)
    took = time.monotonic() - started
    results = shared_results(r)
    assert sorted(results) == ids
    assert {d["status"] for d in results.values()} == {"completed"}
    files = local_results(workers)
    assert sorted(files) == ids and set(files.values()) == {1}  # one result file per job, anywhere
    per_worker = {w.base.name: len(w.published()) for w in workers}
    assert all(n >= 300 for n in per_worker.values()), per_worker  # spread across all three
    for w in workers:  # the shared result is the one the worker that ran the job wrote
        sample = w.published()[0].removesuffix("-result.json")
        assert results[sample]["worker_id"] == w.base.name
    print(f"3000 jobs on 3 supervisors in {took:.1f} s ({3000 / took:.0f} jobs/s): {per_worker}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_9_of_one_supervisor_its_jobs_finish_elsewhere_within_the_lease(
        redis_server, redis_workers) -> None:
    claim_idle, renew, seconds = 3.0, 1.0, 2.0
    env = lease_env(claim_idle, renew)
    workers = [redis_workers(f"k{i}", "--max-concurrent", "3", env=env).start() for i in range(3)]
    victim, survivors = workers[0], workers[1:]
    r = redis_server.client()
    ids = [f"lease-{i:03d}" for i in range(36)]
    xadd_jobs(r, [job(i, "test.sleep", {"seconds": seconds}, max_attempts=2) for i in ids])
    poll_until(lambda: len(executions([victim])) >= 3, 30, "the victim to run 3 jobs")
    victim.kill()  # SIGKILL: no drain, no ack, no goodbye
    killed_at = time.monotonic()
    in_flight = [j for j in executions([victim]) if j not in shared_results(r)]
    assert in_flight, "the victim had nothing in flight"
    poll_until(lambda: all(executions(survivors)[j] for j in in_flight),
               claim_idle + renew + seconds + 2.0, "the victim's jobs to start on the others")
    taken_over = time.monotonic() - killed_at
    poll_until(lambda: settled(r), 120, "every message to be acknowledged", every=0.2)
    results = shared_results(r)
    assert sorted(results) == ids
    assert {d["status"] for d in results.values()} == {"completed"}
    assert set(local_results(workers).values()) == {1}
    runs = executions(workers)
    assert max(runs.values()) <= 2  # never more than max_attempts
    for j in in_flight:
        assert runs[j] == 2 and results[j]["execution_summary"]["attempt"] == 2
        assert results[j]["worker_id"] != victim.base.name
    print(f"{len(in_flight)} in-flight job(s) restarted elsewhere {taken_over:.1f} s after kill -9")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_redis_restart_mid_run_workers_reconnect_and_finish_every_job(
        redis_server, redis_workers) -> None:
    port = free_port()
    env = lease_env(4.0, 1.0)
    first = redis_workers("r0", "--max-concurrent", "3", "--metrics-addr", f"127.0.0.1:{port}",
                          env=env).start()
    workers = [first] + [redis_workers(f"r{i}", "--max-concurrent", "3", env=env).start()
                         for i in (1, 2)]
    r = redis_server.client()
    ids = [f"restart-{i:03d}" for i in range(240)]
    xadd_jobs(r, [job(i, "test.sleep", {"seconds": 0.2}, max_attempts=3) for i in ids])
    poll_until(lambda: len(shared_results(r)) >= 60, 60, "a quarter of the results")
    assert metrics.fetch("127.0.0.1", port, "/readyz")[0] == 200
    redis_server.stop()
    _, body = poll_until(lambda: (lambda a: a if a[0] == 503 else None)(
        metrics.fetch("127.0.0.1", port, "/readyz")), 10, "/readyz to say not ready")
    assert b"redis unreachable" in body
    time.sleep(1.5)  # an outage of some length, with jobs finishing meanwhile
    redis_server.start()
    r = redis_server.client()
    poll_until(lambda: settled(r) and len(shared_results(r)) == len(ids), 120,
               "every job to finish after the restart", every=0.2)
    assert metrics.fetch("127.0.0.1", port, "/readyz")[0] == 200
    results = shared_results(r)
    assert sorted(results) == ids
    assert {d["status"] for d in results.values()} == {"completed"}
    assert max(executions(workers).values()) <= 3
    assert all("redis reachable again" in w.log() for w in workers)
    assert all(w.proc is not None and w.proc.poll() is None for w in workers)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_job_that_crashes_its_child_every_time_is_dead_lettered_others_unaffected(
        redis_server, redis_workers) -> None:
    env = lease_env(4.0, 1.0, redis_max_deliveries=3, retry_backoff=0.2)
    workers = [redis_workers(f"p{i}", "--max-concurrent", "2", env=env).start() for i in range(2)]
    r = redis_server.client()
    others = [f"fine-{i:02d}" for i in range(30)]
    xadd_jobs(r, [job("poison-job-1", "test.segv", {}, max_attempts=20)]
              + [job(i, data={"message": i}) for i in others])
    dead = poll_until(lambda: _dead_letters(redis_server), 60, "a dead letter")
    poll_until(lambda: settled(r) and len(shared_results(r)) == 31, 60, "every job to end")
    assert len(dead) == 1
    letter = dead[0]
    assert letter["job_id"] == "poison-job-1" and letter["reason"] == "poison"
    assert letter["deliveries"] == "3" and letter["last_worker"] in ("p0", "p1")
    assert orjson.loads(letter["last_status"])["attempt"] == 4  # the next one never started
    assert orjson.loads(letter["job"])["operation"] == "test.segv"
    assert executions(workers)["poison-job-1"] == 3
    results = shared_results(r)
    assert results["poison-job-1"]["status"] == "failed"
    assert results["poison-job-1"]["error"]["phase"] == "queue"
    assert "max_deliveries 3" in results["poison-job-1"]["error"]["message"]
    assert all(results[i]["status"] == "completed" for i in others)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_message_whose_workers_kept_dying_is_dead_lettered_at_takeover(
        redis_server, redis_workers) -> None:
    r = redis_server.client()
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    xadd_jobs(r, [job("killer-job-1", "test.sleep", {"seconds": 1}, max_attempts=50)])
    (mid, _), = r.xreadgroup(GROUP, "ghost-1", {STREAM: ">"})[0][1]
    r.xclaim(STREAM, GROUP, "ghost-3", 0, [mid], retrycount=3, justid=True)  # died 3 times
    r.set("guestkit:status:killer-job-1", orjson.dumps(
        {"job_id": "killer-job-1", "state": "running", "attempt": 3, "worker_id": "ghost-3"}))
    w = redis_workers("t0", env=lease_env(1.0, 0.5, redis_max_deliveries=3)).start()
    letter = poll_until(lambda: _dead_letters(redis_server), 30, "a dead letter")[0]
    assert letter["reason"] == "poison" and letter["code"] == "WORKER_LOST"
    assert letter["deliveries"] == "4" and letter["last_worker"] == "ghost-3"
    assert settled(r) and executions([w]) == {}
    assert shared_results(r)["killer-job-1"]["error"]["code"] == "WORKER_LOST"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_malformed_messages_get_a_clear_record_and_are_acked(redis_server, redis_workers) -> None:
    w = redis_workers("m0").start()
    r = redis_server.client()
    r.xadd(STREAM, {"jobb": b"{}"})
    r.xadd(STREAM, {"job": b"{not json"})
    r.xadd(STREAM, {"job": b"[1, 2]"})
    bad = job("badkind-job-1")
    bad["kind"] = "Nope"
    bad_id = r.xadd(STREAM, {"job": orjson.dumps(bad)}).decode()
    xadd_jobs(r, [job("after-bad-1")])
    poll_until(lambda: "after-bad-1" in shared_results(r) and settled(r), 30, "the good job")
    letters = {d["message"][:40]: d for d in _dead_letters(redis_server)}
    assert len(letters) == 4
    reasons = sorted(d["message"].split(": ", 1)[1] for d in letters.values()
                     if d["reason"] == "malformed")
    assert reasons == [
        "no 'job' field (fields: jobb)", "the 'job' field is not a JSON object: it is list",
        "the 'job' field is not a JSON object: unexpected character, expected a string key: "
        "line 1 column 2 (char 1)"]
    rejected = next(d for d in letters.values() if d["reason"] == "rejected")
    assert rejected["job_id"] == "badkind-job-1" and "kind" in rejected["message"]
    res = shared_results(r)["badkind-job-1"]
    assert res["status"] == "failed" and res["error"]["code"] == "VALIDATION_ERROR"
    assert res == orjson.loads(w.results.joinpath("badkind-job-1-result.json").read_bytes())
    assert r.xpending(STREAM, GROUP)["pending"] == 0
    kept = sorted(p.name for p in (w.jobs / "rejected").iterdir())  # named by its message id
    assert kept == [f"queue-{bad_id}.json", f"queue-{bad_id}.json.error.json"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_message_without_a_job_id_is_named_as_a_message_in_its_record(
        redis_server, redis_workers) -> None:
    redis_workers("m1").start()
    r = redis_server.client()
    mid = r.xadd(STREAM, {"job": b'{"x": 1}'}).decode()  # an object, but no job (nor id)
    poll_until(lambda: _dead_letters(redis_server) and settled(r), 30, "its dead letter")
    [letter] = _dead_letters(redis_server)
    assert letter["message"].startswith(f"message {mid}: field 'version': required"), letter


@pytest.mark.timeout(120)
def test_an_idempotency_key_is_shared_by_all_workers(redis_server, redis_workers) -> None:
    workers = [redis_workers(f"i{i}", "--max-concurrent", "1").start() for i in range(2)]
    r = redis_server.client()
    xadd_jobs(r, [job("idem-first-1", "test.sleep", {"seconds": 1.5}, idempotency_key="k-1"),
                  job("idem-second-1", "test.sleep", {"seconds": 1.5}, idempotency_key="k-1")])
    poll_until(lambda: len(shared_results(r)) == 2 and settled(r), 30, "both results")
    results = shared_results(r)
    ran = executions(workers)
    assert len(ran) == 1 and set(ran.values()) == {1}  # one of the two ran, once
    first, = ran
    second = ({"idem-first-1", "idem-second-1"} - {first}).pop()
    assert results[second]["idempotent_replay"] == {"job_id": first}
    assert results[second]["data"] == results[first]["data"]


def _cli(server: RedisServer, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd, *rest = args
    proc = subprocess.run([sys.executable, "-m", "worker", cmd, "--redis-url", server.url, *rest],
                          capture_output=True, text=True, timeout=120, env=Worker(server.dir, [], None).env)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_cli_submit_status_result_list_cancel_against_redis(redis_server, redis_workers) -> None:
    redis_workers("c0", "--max-concurrent", "1").start()
    done = _cli(redis_server, "submit", "-o", "system.echo", "-d", '{"message": "hi"}',
                "--job-id", "cli-echo-1", "--wait")
    assert "submitted cli-echo-1" in done.stdout
    assert orjson.loads(done.stdout.split("\n", 1)[1])["data"]["echo"]["message"] == "hi"
    assert "cli-echo-1: running" in done.stderr or "cli-echo-1: completed" in done.stderr
    assert orjson.loads(_cli(redis_server, "result", "cli-echo-1").stdout)["status"] == "completed"
    assert orjson.loads(_cli(redis_server, "status", "cli-echo-1").stdout)["state"] == "completed"
    again = _cli(redis_server, "submit", "-o", "system.echo", "--job-id", "cli-echo-1", check=False)
    assert again.returncode != 0 and "already finished" in again.stderr
    _cli(redis_server, "submit", "-o", "test.sleep", "--job-id", "cli-forever-1")
    _cli(redis_server, "submit", "-o", "test.sleep", "--job-id", "cli-waiting-1")
    r = redis_server.client()
    poll_until(lambda: b'"running"' in (r.get("guestkit:status:cli-forever-1") or b""), 30,
               "the first job to run")
    assert "pending" in _cli(redis_server, "status", "cli-waiting-1").stdout  # not yet delivered
    late = _cli(redis_server, "submit", "-o", "system.echo", "--job-id", "cli-patient-1",
                "--pool", "unserved", "--wait-timeout", "0.5", check=False)
    assert late.returncode == 124 and late.stderr.splitlines()[-1] == (
        "cli-patient-1: gave up waiting (--wait-timeout); the job stays submitted, as last "
        "seen: pending")
    out = _cli(redis_server, "cancel", "cli-waiting-1")  # still in the stream: cancelled on delivery
    assert out.stdout == "cancel requested for cli-waiting-1\n"  # known: submit wrote its status
    out = _cli(redis_server, "cancel", "cli-typo-1")
    assert out.stdout == ("cancel requested for cli-typo-1 (no job with this id is known in redis "
                          "yet: the request waits 86400 s for one, added by a producer with XADD)\n")
    _cli(redis_server, "cancel", "cli-forever-1")  # running: the owning worker hears it
    poll_until(lambda: len(shared_results(r)) == 3 and settled(r), 30, "both cancels")
    results = shared_results(r)
    assert results["cli-forever-1"]["status"] == "cancelled"
    assert results["cli-waiting-1"]["status"] == "cancelled"
    table = _cli(redis_server, "list").stdout
    assert all(j in table for j in ("cli-echo-1", "cli-forever-1", "cli-waiting-1"))
    assert "cli-forever-1" in _cli(redis_server, "list", "--state", "cancelled").stdout
    late = _cli(redis_server, "cancel", "cli-echo-1", check=False)
    assert late.returncode != 0 and "already finished" in late.stderr
    _cli(redis_server, "submit", "-o", "test.sleep", "-d", '{"seconds": 2}', "--job-id", "cli-watch-1")
    watched = _cli(redis_server, "status", "cli-watch-1", "--watch").stdout
    assert '"status": "completed"' in watched or '"state": "completed"' in watched
    assert watched.count("cli-watch-1") >= 2  # refreshed until the job ended


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_worker_started_without_redis_is_not_ready_and_catches_up(tmp_path, redis_workers) -> None:
    server = RedisServer(tmp_path / "late-redis")
    port = free_port()
    w = redis_workers("late0", "--redis-url", server.url, "--metrics-addr", f"127.0.0.1:{port}").start()
    code, body = metrics.fetch("127.0.0.1", port, "/readyz")
    assert code == 503 and b"redis unreachable" in body
    server.start()
    try:
        r = server.client()
        xadd_jobs(r, [job("late-job-1")])
        poll_until(lambda: settled(r) and shared_results(r), 30, "the job to run")
        assert metrics.fetch("127.0.0.1", port, "/readyz")[0] == 200
        assert "redis reachable again" in w.log()
    finally:
        server.stop()
    w.signal(signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("cancellable", [True, False])  # a copy elsewhere is no client's cancel
def test_a_drained_worker_gives_back_what_it_never_started_and_drops_it_after_a_restart(
        redis_server, redis_workers, cancellable: bool) -> None:
    first = redis_workers("d0", "--max-concurrent", "2").start()
    r = redis_server.client()
    doc = job("needs-feature-1", "test.sleep", {"seconds": 0.1}, cancellable=cancellable)
    doc["constraints"] = {"required_features": ["gpu-nope"]}
    xadd_jobs(r, [doc])
    poll_until(lambda: b"waiting_for" in (r.get("guestkit:status:needs-feature-1") or b""), 30,
               "the job to wait for its feature on d0")
    assert first.stop() == 0
    assert r.xlen(STREAM) == 1 and r.xpending(STREAM, GROUP)["pending"] == 0  # given back
    assert "went back to the stream unstarted" in first.log()
    second = redis_workers("d1", "--feature", "gpu-nope").start()
    poll_until(lambda: settled(r) and shared_results(r), 30, "the job to run on d1")
    assert shared_results(r)["needs-feature-1"]["worker_id"] == "d1"
    first.start()  # its spool still holds the job it gave back
    poll_until(lambda: (first.jobs / "failed" / "needs-feature-1.json").exists(), 30,
               "d0 to drop its local copy")
    assert "went back to the stream or to another worker" in first.log()
    assert "cancel refused" not in first.log()  # a stale copy is no client's cancel
    assert "this copy leaves no result" in first.log() and "came first" not in first.log()
    assert shared_results(r)["needs-feature-1"]["status"] == "completed"
    assert first.result("needs-feature-1") is None and executions([first, second]) == {
        "needs-feature-1": 1}


@pytest.mark.timeout(120)
def test_a_second_message_with_a_job_id_in_use_is_dead_lettered_without_touching_it(
        redis_server, redis_workers) -> None:
    """Whether it comes while the first runs, is not even a valid job, or comes after the
    first finished: the job runs once and keeps its own result."""
    w = redis_workers("d0").start()
    r = redis_server.client()
    first = r.xadd(STREAM, {"job": orjson.dumps(job("dup-id", "test.sleep", {"seconds": 1.5}))})
    poll_until(lambda: b'"running"' in (r.get("guestkit:status:dup-id") or b""), 30, "it to run")
    bad = job("dup-id")
    bad["kind"] = "Nope"
    r.xadd(STREAM, {"job": orjson.dumps(bad)})
    r.xadd(STREAM, {"job": orjson.dumps(job("dup-id", "test.ledger"))})
    poll_until(lambda: "dup-id" in shared_results(r) and settled(r), 30, "the first's result")
    r.xadd(STREAM, {"job": orjson.dumps(job("dup-id"))})  # after it finished
    poll_until(lambda: len(_dead_letters(redis_server)) == 3 and settled(r), 30, "the late one")
    letters = _dead_letters(redis_server)
    assert {d["reason"] for d in letters} == {"duplicate"}
    assert {d["duplicate_of"] for d in letters} == {first.decode()}
    assert letters[0]["message"].startswith("job 'dup-id': field 'job_id': duplicate; message ")
    res = shared_results(r)["dup-id"]
    assert res["status"] == "completed" and res["worker_id"] == "d0"
    assert executions([w])["dup-id"] == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("wipe", ["xtrim", "flushall"])
def test_jobs_whose_messages_are_trimmed_away_while_they_run_still_finish(
        redis_server, redis_workers, wipe: str) -> None:
    """A producer's XADD MAXLEN (or an XTRIM, or a FLUSHALL) deletes pending entries too:
    nobody else can run those jobs, so the worker running them finishes them and stores
    their results."""
    w = redis_workers("t0", "--max-concurrent", "3", env=lease_env(4, 1)).start()
    r = redis_server.client()
    ids = [f"trimmed-{i}" for i in range(3)]
    xadd_jobs(r, [job(i, "test.sleep", {"seconds": 3}) for i in ids])
    poll_until(lambda: all(b'"running"' in (r.get(f"guestkit:status:{i}") or b"") for i in ids),
               30, "all three to run")
    if wipe == "xtrim":
        r.xtrim(STREAM, maxlen=0)
    else:
        r.flushall()
    poll_until(lambda: all(i in shared_results(r) for i in ids), 60, "their results")
    assert {shared_results(r)[i]["status"] for i in ids} == {"completed"}
    assert executions([w]) == dict.fromkeys(ids, 1)
    assert "left the stream while it ran here" in w.log()
    assert "taken for dead" not in w.log()


@pytest.mark.timeout(120)
def test_a_job_waiting_for_an_idempotency_key_can_be_cancelled(redis_server, redis_workers) -> None:
    redis_workers("k0", "--max-concurrent", "2").start()
    r = redis_server.client()
    xadd_jobs(r, [job("key-holder", "test.sleep", {"seconds": 30}, idempotency_key="k-c")])
    poll_until(lambda: b'"running"' in (r.get("guestkit:status:key-holder") or b""), 30,
               "the holder to run")
    xadd_jobs(r, [job("key-waiter", "test.ledger", idempotency_key="k-c")])
    poll_until(lambda: r.xpending(STREAM, GROUP)["pending"] == 2, 30, "the waiter to be read")
    waits = poll_until(lambda: orjson.loads(r.get("guestkit:status:key-waiter") or b"{}").get(
        "waiting_for"), 30, "the waiter's shared status to say why it waits")
    assert waits == "idempotency key 'k-c' is held by job 'key-holder', not yet finished"
    _cli(redis_server, "cancel", "key-waiter")
    poll_until(lambda: "key-waiter" in shared_results(r), 20, "the waiter's result")
    assert shared_results(r)["key-waiter"]["status"] == "cancelled"
    assert "key-holder" not in shared_results(r)  # cancelled while the holder still ran
    _cli(redis_server, "cancel", "key-holder")
    poll_until(lambda: len(shared_results(r)) == 2 and settled(r), 30, "the holder's end")


@pytest.mark.timeout(120)
def test_a_worker_paused_past_its_lease_loses_its_job_and_the_record_says_so(
        redis_server, redis_workers) -> None:
    """The other worker takes the message over; with no attempts left the job fails as
    WORKER_LOST, and the paused copy's later outcome is not the job's."""
    env = lease_env(3, 1)
    workers = [redis_workers(f"p{i}", env=env).start() for i in range(2)]
    r = redis_server.client()
    xadd_jobs(r, [job("paused-job", "test.sleep", {"seconds": 4}, max_attempts=1)])
    holder = poll_until(lambda: next((w for w in workers if executions([w])["paused-job"]), None),
                        30, "the job to start")
    holder.signal(signal.SIGSTOP)
    try:
        res = poll_until(lambda: shared_results(r).get("paused-job"), 30, "the takeover's end")
    finally:
        holder.signal(signal.SIGCONT)
    assert res["error"]["code"] == "WORKER_LOST" and res["worker_id"] != holder.base.name
    assert "stopped renewing its lease" in res["error"]["message"], res["error"]
    poll_until(lambda: "stopping this copy" in holder.log(), 30, "the paused copy to stop")
    assert shared_results(r)["paused-job"] == res


@pytest.mark.timeout(120)
def test_a_dropped_file_named_like_a_queue_message_is_recovered_as_a_dropped_job(
        redis_server, redis_workers) -> None:
    w = redis_workers("q0").start()
    w.drop(job("looks-queued-1", "test.sleep", {"seconds": 3}, max_attempts=2),
           name="queue-2024-12.json")
    wait_until(lambda: w.runs("looks-queued-1"), [w.outputs], 30, "the job to start")
    w.kill()
    w.start()  # no message 2024-12 is this worker's: that is no reason to drop the job
    res = w.wait_result("looks-queued-1", 60)
    assert res["status"] == "completed" and res["execution_summary"]["attempt"] == 2
    assert "went back to the stream or to another worker" not in w.log()


@pytest.mark.timeout(120)
def test_a_worker_whose_slots_fill_while_it_reads_leaves_the_next_message_to_others(
        redis_server, redis_workers) -> None:
    r = redis_server.client()
    no_takeover = lease_env(claim_idle=60, renew=20)
    full = redis_workers("full", "--max-concurrent", "1", env=no_takeover).start()
    poll_until(lambda: blocked_reads(r) == 1, 30, "the worker to wait on a read")
    full.drop(job("local-busy", "test.sleep", {"seconds": 60}))  # its one slot, from the inbox
    status = full.jobs / ".status" / "local-busy.json"
    wait_until(lambda: status.exists() and b'"running"' in status.read_bytes(),
               [status.parent], 30, "the inbox's job to run")
    xadd_jobs(r, [job("queue-next")])  # while the read asked for before the slot filled could wait
    other = redis_workers("other", env=no_takeover).start()
    poll_until(lambda: shared_results(r).get("queue-next"), 30, "the message to run elsewhere")
    assert shared_results(r)["queue-next"]["worker_id"] == "other"
    assert full.result("local-busy") is None  # still busy: the message never waited behind it
    assert "queue-next" not in full.log() and full.result("queue-next") is None
    assert other.result("queue-next") is not None


@pytest.mark.timeout(120)
def test_a_worker_that_starts_on_a_full_stream_takes_no_more_than_its_slots(
        redis_server, redis_workers) -> None:
    r = redis_server.client()
    no_takeover = lease_env(claim_idle=60, renew=20)
    xadd_jobs(r, [job(f"backlog-{i}", "test.sleep", {"seconds": 60}) for i in range(4)])
    first = redis_workers("first", "--max-concurrent", "1", env=no_takeover).start()
    poll_until(lambda: "running: pid" in first.log(), 30, "its first job to run")
    # what one read delivered was not yet running when the next read was sized
    holders = {c["name"].decode(): c["pending"] for c in r.xpending(STREAM, GROUP)["consumers"]}
    assert holders == {"first": 1}, holders
    second = redis_workers("second", "--max-concurrent", "1", env=no_takeover).start()
    poll_until(lambda: "running: pid" in second.log(), 30, "the next job to run elsewhere")
    assert "[backlog-1]" not in first.log()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_worker_restarted_within_its_lease_shares_and_counts_the_run_it_starts_again(
        redis_server, redis_workers) -> None:
    r = redis_server.client()
    no_takeover = lease_env(claim_idle=60, renew=20)  # only the restart can run it again

    def shared(job_id: str) -> dict:
        return orjson.loads(r.get(f"guestkit:status:{job_id}") or b"{}")

    w = redis_workers("phoenix", env=no_takeover).start()
    xadd_jobs(r, [job("again-1", "test.sleep", {"seconds": 30}, max_attempts=3)])
    poll_until(lambda: shared("again-1").get("state") == "running", 30, "the first run")
    w.kill()  # as a crash that Restart=on-failure follows at once, well within the lease
    w.start()
    status = poll_until(lambda: (s := shared("again-1")).get("attempt") == 2 and
                        s.get("state") == "running" and s, 30, "the shared status of the second run")
    assert status["worker_id"] == "phoenix"
    pending = r.xpending_range(STREAM, GROUP, "-", "+", 10)
    assert [p["times_delivered"] for p in pending] == [2]  # what poison detection counts
    assert executions([w]) == {"again-1": 2}
