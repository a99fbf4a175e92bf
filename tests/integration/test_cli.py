"""The client commands against a live supervisor: submit --wait, status, result, list, cancel."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from conftest import Worker, job, wait_until


def test_submit_from_flags_with_wait_prints_progress_and_the_result(worker: Worker) -> None:
    out = worker.cli("submit", "--operation", "system.echo", "--data", '{"hi": 1}',
                     "--job-id", "cli-1", "--idempotency-key", "cli-key", "--timeout", "30",
                     "--priority", "7", "--wait")
    assert out.stdout.startswith("submitted cli-1\n")
    res = orjson.loads(out.stdout.split("\n", 1)[1])
    assert res["status"] == "completed" and res["data"]["echo"] == {"hi": 1}
    assert res["execution_summary"]["idempotency_key"] == "cli-key"
    assert out.stderr.splitlines()[-1] == "cli-1: completed"  # the follower ends on the outcome
    done = worker.jobs / "done" / "cli-1.json"
    wait_until(done.exists, [done.parent], 10, "the job file to be archived")
    archived = orjson.loads(done.read_bytes())
    assert archived["execution"] == {"idempotency_key": "cli-key", "timeout_seconds": 30,
                                     "priority": 7}


def test_submit_from_a_file_and_fetch_result_status_list(worker: Worker, tmp_path) -> None:
    path = tmp_path / "mine.json"
    path.write_bytes(orjson.dumps(job("from-file")))
    assert worker.cli("submit", str(path)).stdout == "submitted from-file\n"
    worker.wait_result("from-file")
    done = worker.jobs / "done" / "from-file.json"  # its live status goes after that
    wait_until(done.exists, [done.parent], 10, "the job file to be archived")
    assert orjson.loads(worker.cli("result", "from-file").stdout)["status"] == "completed"
    out = worker.cli("result", "no-such-job", check=False)
    assert out.returncode == 1 and out.stderr == (
        f"Error: job 'no-such-job' has no result yet in {worker.results} (nor is it queued "
        f"or running in {worker.jobs})\n")
    shown = orjson.loads(worker.cli("status", "from-file").stdout)  # from its result
    assert shown["state"] == shown["status"] == "completed"  # `state`, as while it ran
    table = worker.cli("list", "--state", "completed").stdout
    assert "from-file" in table and "completed" in table
    assert "from-file" not in worker.cli("list", "--state", "failed").stdout


def test_submit_refuses_an_invalid_job_with_the_reason(worker: Worker, tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(orjson.dumps(job("bad-submit", timeout_seconds=0)))
    out = worker.cli("submit", str(path), check=False)
    assert out.returncode == 1
    assert "job 'bad-submit': field 'execution.timeout_seconds'" in out.stderr
    assert not (worker.jobs / "bad-submit.json").exists()


def test_submit_refuses_an_integer_it_would_round(worker: Worker, tmp_path) -> None:
    """The client reads the job before it writes it again: a wider integer would leave it
    as a float, which the worker could no longer tell from one that was sent."""
    path = tmp_path / "wide.json"
    path.write_bytes(orjson.dumps(job("wide-submit", data={"n": "@"})).replace(
        b'"@"', str(2**70).encode()))
    out = worker.cli("submit", str(path), check=False)
    assert out.returncode == 1
    assert (f"{path}: field 'payload.data.n': expected an integer from -2**63 to 2**64-1 "
            f"(send a wider one as a string), got {2**70}") in out.stderr
    out = worker.cli("submit", "-o", "system.echo", "-d", f'{{"n": [{-(2**64)}]}}',
                     "--job-id", "wide-flags", check=False)
    assert out.returncode == 1 and "--data: field 'n.0': expected an integer" in out.stderr
    out = worker.cli("submit", "-o", "system.echo", "-d", str(2**70), check=False)
    assert out.returncode == 1 and out.stderr.endswith(f"--data: expected an integer from "
                                                       f"-2**63 to 2**64-1 (send a wider one "
                                                       f"as a string), got {2**70}\n")
    path.write_bytes(orjson.dumps(job("wide-submit", data={"n": 1})).replace(b'"n":1', b'"n":1,"n":2'))
    out = worker.cli("submit", str(path), check=False)
    assert out.returncode == 1 and (f"{path}: field 'payload.data.n': expected each key once in "
                                    "its object, got it twice") in out.stderr
    assert not list(worker.jobs.glob("wide-*"))


def test_validate_takes_files_as_the_supervisor_does(worker: Worker, tmp_path: Path) -> None:
    """The same file checks, size cap, duplicate check and routing as the daemon's."""
    good = tmp_path / "good.json"
    good.write_bytes(orjson.dumps(job("v-good")))
    os.mkfifo(tmp_path / "fifo.json")  # reading it would block forever
    (tmp_path / "link.json").symlink_to(good)
    (tmp_path / "big.json").write_bytes(b" " * (1 << 20) + orjson.dumps(job("v-big")))
    (tmp_path / "away.json").write_bytes(orjson.dumps(job("v-away") | {
        "routing": {"worker_pool": "elsewhere"}}))
    worker.drop(job("v-done"))
    worker.wait_result("v-done")
    (tmp_path / "done.json").write_bytes(orjson.dumps(job("v-done")))
    names = ("good", "fifo", "link", "big", "away", "done")
    out = worker.cli("validate", *(str(tmp_path / f"{n}.json") for n in names), check=False)
    lines = dict(zip(names, out.stdout.splitlines(), strict=True))
    assert out.returncode == 1
    assert lines["good"].endswith("good.json: OK (v-good, system.echo)")
    assert lines["fifo"].endswith("fifo.json: is a FIFO, not a regular file")
    assert lines["link"].endswith("link.json: is a symbolic link; job files must be regular files")
    assert lines["big"].endswith(f"big.json: is {(1 << 20) + len(orjson.dumps(job('v-big')))} "
                                 "bytes, over the limit of 1048576 bytes")
    assert lines["away"].endswith("away.json: OK (v-away, system.echo); it would wait: "
                                  "routing.worker_pool is 'elsewhere'; this worker serves pool "
                                  "'default' (its operation and payload are checked by a worker "
                                  "it is meant for)")
    assert "INVALID VALIDATION_ERROR: job 'v-done': field 'job_id': duplicate" in lines["done"]
    out = worker.cli("validate", "--pool", "elsewhere", str(tmp_path / "away.json"))
    assert out.stdout.endswith("away.json: OK (v-away, system.echo)\n")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "disk.raw").write_bytes(b"\0" * 4096)
    (tmp_path / "image.json").write_bytes(orjson.dumps(job("v-image", "guestkit.inspect", {
        "image": {"path": str(tmp_path / "images" / "disk.raw")}})))
    out = worker.cli("validate", str(tmp_path / "image.json"), check=False)
    assert "this worker has no image roots configured" in out.stdout
    out = worker.cli("validate", "--image-root", str(tmp_path / "images"), str(tmp_path / "image.json"))
    assert out.stdout.endswith("image.json: OK (v-image, guestkit.inspect)\n")
    (tmp_path / "image-away.json").write_bytes(orjson.dumps(job("v-image-away", "guestkit.inspect", {
        "image": {"path": str(tmp_path / "images" / "disk.raw")}}) | {
        "routing": {"worker_pool": "elsewhere"}}))  # judged by the image roots of that pool
    out = worker.cli("validate", str(tmp_path / "image-away.json"))
    assert "OK (v-image-away, guestkit.inspect); it would wait: routing.worker_pool" in out.stdout


def test_submit_wait_exits_1_for_a_failed_job(worker: Worker) -> None:
    out = worker.cli("submit", "-o", "test.raise", "-d", '{"permanent": true}', "--job-id",
                     "cli-fail", "--wait", check=False)
    assert out.returncode == 1
    assert '"code": "EXECUTION_ERROR"' in out.stdout
    assert out.stderr.splitlines()[-1] == "cli-fail: failed"


def test_status_table_shows_running_jobs_with_progress(worker: Worker) -> None:
    worker.drop(job("slowpoke", "test.sleep", {"seconds": 30}))
    def row() -> str | None:  # "running" may be shown before the job's first progress
        lines = [ln for ln in worker.cli("status").stdout.splitlines() if ln.startswith("slowpoke")]
        return lines[0] if lines and "10%" in lines[0] else None

    line = wait_until(row, [worker.jobs / ".status"], 20, "the job's progress")
    assert "running" in line and "1/1" in line


def test_cancel_a_queued_and_a_running_job(make_worker) -> None:
    w = make_worker("--max-concurrent", "1", "--kill-grace", "1").start()
    w.drop(job("busy", "test.sleep", {}))
    wait_until(lambda: (w.jobs / ".status" / "busy.json").exists() and
               b'"running"' in (w.jobs / ".status" / "busy.json").read_bytes(),
               [w.jobs / ".status"], 20)
    w.drop(job("waiting", priority=9))
    wait_until(lambda: "[waiting] queued" in w.log(), [w.jobs / ".active"])
    table = w.cli("status").stdout.splitlines()
    assert table[0].split() == ["JOB_ID", "STATE", "PRIO", "ATTEMPT", "PROGRESS", "DETAIL"]
    row = next(ln for ln in table if ln.startswith("waiting "))
    assert row.split()[1:] == ["queued", "9", "1/1", "-", "next", "free", "slot"], row
    out = w.cli("result", "waiting", check=False)
    assert out.stderr == f"Error: job 'waiting' has no result yet in {w.results}\n"
    assert w.cli("cancel", "waiting").stdout == "cancel requested for waiting\n"
    res = w.wait_result("waiting")
    assert res["status"] == "cancelled" and res["error"]["code"] == "CANCELLED"
    w.cli("cancel", "busy")
    res = w.wait_result("busy")
    assert res["status"] == "cancelled" and "while running" in res["error"]["message"]


def test_a_non_cancellable_job_refuses_cancel(worker: Worker) -> None:
    worker.drop(job("stubborn", "test.sleep", {"seconds": 4}, cancellable=False))
    wait_until(lambda: (worker.jobs / ".status" / "stubborn.json").exists(),
               [worker.jobs / ".status"])
    out = worker.cli("cancel", "stubborn", check=False)
    assert out.returncode == 1
    assert out.stderr == ("Error: job 'stubborn' cannot be cancelled: its execution.cancellable "
                          "is false\n")
    assert not (worker.jobs / ".cancel" / "stubborn").exists()
    assert worker.wait_result("stubborn")["status"] == "completed"


def test_cancel_refused_by_the_supervisor_ends_a_wait_with_1(make_worker) -> None:
    """The client cannot see a job still in the inbox: the supervisor refuses on arrival."""
    w = make_worker("--max-concurrent", "1").start()
    w.drop(job("gate", "test.sleep", {"seconds": 30}))
    wait_until(lambda: (w.jobs / ".status" / "gate.json").exists(), [w.jobs / ".status"])
    client = subprocess.Popen(
        [sys.executable, "-m", "worker", "cancel", "--jobs-dir", str(w.jobs), "--results-dir",
         str(w.results), "late-stubborn", "--wait"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=w.env)
    wait_until(lambda: (w.jobs / ".cancel" / "late-stubborn").exists(), [w.jobs / ".cancel"])
    w.drop(job("late-stubborn", cancellable=False))
    stdout, stderr = client.communicate(timeout=60)
    assert client.returncode == 1, stdout + stderr
    assert stdout.startswith("cancel requested for late-stubborn (no such job is queued")
    assert stderr.endswith("late-stubborn: cancel refused (see the worker's log)\n")
    assert "cancel refused: execution.cancellable is false" in w.log()
    w.cli("cancel", "gate")
    assert w.wait_result("late-stubborn")["status"] == "completed"


def test_cancel_wait_prints_the_cancelled_result(make_worker) -> None:
    w = make_worker("--max-concurrent", "1", "--kill-grace", "1").start()
    w.drop(job("to-stop", "test.sleep", {"seconds": 30}))
    wait_until(lambda: b'"running"' in ((w.jobs / ".status" / "to-stop.json").read_bytes()
                                        if (w.jobs / ".status" / "to-stop.json").exists() else b""),
               [w.jobs / ".status"], 20)
    out = w.cli("cancel", "to-stop", "--wait")
    assert out.stdout.startswith("cancel requested for to-stop\n")
    assert orjson.loads(out.stdout.split("\n", 1)[1])["status"] == "cancelled"
    assert out.stderr.splitlines()[-1] == "to-stop: cancelled"


def test_a_deadline_in_the_past_fails_with_deadline_exceeded(worker: Worker) -> None:
    worker.drop(job("late", deadline="2020-01-01T00:00:00Z"))
    res = worker.wait_result("late")
    assert res["error"]["code"] == "DEADLINE_EXCEEDED"
    assert "field 'execution.deadline'" in res["error"]["message"]


def test_a_job_this_worker_cannot_satisfy_waits_and_says_why(worker: Worker) -> None:
    # an image this worker may not read (it has no image roots): for the pool it names to judge
    doc = job("elsewhere", "guestkit.inspect", {"image": {"path": "/mnt/vms/web-01.qcow2"}})
    doc["constraints"] = {"allowed_worker_pools": ["pool-secure"]}
    worker.drop(doc)
    status = wait_until(lambda: (worker.jobs / ".status" / "elsewhere.json").exists() and
                        orjson.loads((worker.jobs / ".status" / "elsewhere.json").read_bytes()),
                        [worker.jobs / ".status"])
    assert status["state"] == "queued"
    assert "allowed_worker_pools is ['pool-secure']; this worker serves pool 'default'" in \
        status["waiting_for"]
    assert "allowed_worker_pools" in worker.cli("status").stdout
    assert worker.result("elsewhere") is None


def _waiting_for(w: Worker, job_id: str) -> str:
    path = w.jobs / ".status" / f"{job_id}.json"
    status = wait_until(lambda: path.exists() and orjson.loads(path.read_bytes()),
                        [w.jobs / ".status"], 20, f"{job_id}'s status")
    assert status["state"] == "queued", status
    return str(status["waiting_for"])


def test_affinity_and_anti_affinity_match_the_workers_labels(make_worker) -> None:
    """Labels: the configured ones (here from the environment), plus host, worker_id, pool."""
    w = make_worker("--worker-id", "w-eu-1",
                    env={"GUESTKIT_WORKER_LABELS": "zone=eu,disk=ssd"}).start()
    host = socket.gethostname()
    runs = {"near": {"affinity": {"zone": "eu", "pool": "default", "host": host}},
            "not-there": {"anti_affinity": {"zone": ["us"], "worker_id": ["w-us-1"]}}}
    waits = {
        "far": ({"affinity": {"zone": "us"}}, "routing.affinity.zone is 'us'; this worker's is 'eu'"),
        "gpu": ({"affinity": {"gpu": "a100"}}, "routing.affinity.gpu is 'a100'; this worker has no "
                "label 'gpu'"),
        "avoid": ({"anti_affinity": {"host": [host]}},
                  f"routing.anti_affinity.host excludes {host!r}, this worker's host"),
    }
    for job_id, routing in [*runs.items(), *((k, r) for k, (r, _) in waits.items())]:
        w.drop(job(job_id) | {"routing": routing})
    for job_id in runs:
        assert w.wait_result(job_id)["status"] == "completed"
    for job_id, (_, why) in waits.items():
        assert _waiting_for(w, job_id) == why
    assert w.result("far") is None
    far = w.base / "far.json"
    far.write_bytes(orjson.dumps(job("far-2") | {"routing": waits["far"][0]}))
    out = w.cli("validate", "--label", "zone=us", str(far))
    assert out.stdout == f"{far}: OK (far-2, system.echo)\n"
    out = w.cli("validate", "--label", "zone", str(far), check=False)
    assert out.returncode == 2 and "expected KEY=VALUE, got 'zone'" in out.stderr


@pytest.mark.parametrize(("labels", "error"), [
    ("zone", "GUESTKIT_WORKER_LABELS: expected KEY=VALUE, got 'zone'"),
    ("zone=eu,host=x", "labels ['host'] are the worker's own (its host name, worker_id and "
                       "pool); choose other names"),
])
def test_labels_a_worker_cannot_honour_are_refused(worker: Worker, labels: str, error: str) -> None:
    out = subprocess.run([sys.executable, "-m", "worker", "config", "show"], capture_output=True,
                         text=True, env={**worker.env, "GUESTKIT_WORKER_LABELS": labels})
    assert out.returncode == 1 and error in out.stderr, out.stderr


def test_capabilities_lists_operations_and_payload_types(worker: Worker) -> None:
    caps = orjson.loads(worker.cli("capabilities").stdout)
    ops = {o["operation"]: o for o in caps["operations"]}
    assert ops["system.echo"]["payload_types"] == ["system.echo.v1", "test.echo.v1"]
    assert ops["test.schema"]["available"] is True
    assert "system.echo" in caps["capabilities"]


def test_config_show_says_where_each_value_came_from(worker: Worker, tmp_path) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text("[worker]\nmax_concurrent = 3\npool = 'from-file'\n")
    env = {**worker.env, "GUESTKIT_WORKER_POOL": "from-env"}
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "worker", "config", "show", "--config", str(cfg)],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert f"max_concurrent = 3    # file {cfg}" in out
    assert 'pool = "from-env"    # environment' in out
    assert "kill_grace = 5.0    # default" in out


def test_status_watch_follows_a_job_until_it_ends(worker: Worker) -> None:
    worker.drop(job("watched", "test.sleep", {"seconds": 2}))
    wait_until(lambda: "[watched] running" in worker.log(), [worker.jobs / ".status"], 20)
    out = worker.cli("status", "watched", "--watch").stdout
    assert '"state": "running"' in out  # refreshed while it ran
    assert out.rstrip().endswith("}") and '"status": "completed"' in out.split("\n\n")[-1]


def test_commands_refuse_a_job_id_that_could_name_another_file(worker: Worker) -> None:
    worker.drop(job("target"))
    before = worker.wait_result("target")
    for command in ("cancel", "result", "logs", "status"):
        out = worker.cli(command, "../../results/target-result.json", check=False)
        assert out.returncode == 2, (command, out.stdout, out.stderr)
        assert "expected 1-128 characters of A-Z a-z 0-9 . _ -" in out.stderr, out.stderr
    assert worker.result("target") == before
    assert sorted(os.listdir(worker.jobs / ".cancel")) == []


def test_submit_refuses_an_id_that_has_already_run(worker: Worker) -> None:
    worker.drop(job("ran-once"))
    first = worker.wait_result("ran-once")
    out = worker.cli("submit", "-o", "system.echo", "-d", "{}", "--job-id", "ran-once", "--wait",
                     check=False)
    assert out.returncode == 1
    assert "job 'ran-once' has already run" in out.stderr and "never reused" in out.stderr
    assert worker.result("ran-once") == first and not list((worker.jobs / "rejected").iterdir())


def test_cancel_needs_an_existing_spool(worker: Worker, tmp_path: Path) -> None:
    typo = tmp_path / "typo" / "jobs"
    out = subprocess.run([sys.executable, "-m", "worker", "cancel", "--jobs-dir", str(typo), "x"],
                         capture_output=True, text=True, env=worker.env, timeout=60)
    assert out.returncode == 1 and f"no spool at {typo}" in out.stderr
    assert not typo.parent.exists()


@pytest.mark.parametrize("mistake", ["user", "group", "jobs-dir-is-a-file", "output-dir-in-use"])
def test_an_operator_mistake_at_start_is_one_clear_line(make_worker, mistake: str) -> None:
    if mistake != "jobs-dir-is-a-file" and os.geteuid() != 0:
        pytest.skip("a job user (and its group) is used only when the worker runs as root")
    w = make_worker()
    w.base.joinpath("afile").write_text("")
    busy = w.base / "in-use"  # not empty, not the job user's: never changed
    busy.mkdir(mode=0o755)
    (busy / "keep").write_text("")
    args, env, expected = {
        "user": (["--user", "nosuchuser"], {}, "setting 'user': no such user 'nosuchuser'"),
        "group": ([], {"GUESTKIT_WORKER_GROUP": "nosuchgroup"},
                  "setting 'group': no such group 'nosuchgroup'"),
        "jobs-dir-is-a-file": (["--jobs-dir", str(w.base / "afile")], {}, "cannot be made"),
        "output-dir-in-use": (["--output-dir", str(busy)], {},
                              f"output dir {busy}: jobs run as uid"),
    }[mistake]
    proc = subprocess.run([sys.executable, "-m", "worker", "supervise", *w.args(), *args],
                          capture_output=True, text=True, env={**w.env, **env}, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert oct(busy.stat().st_mode & 0o777) == "0o755"


def test_a_client_command_on_a_spool_path_that_is_a_file_says_so(worker: Worker) -> None:
    afile = worker.base / "afile"
    afile.write_text("")
    out = subprocess.run([sys.executable, "-m", "worker", "status", "--jobs-dir", str(afile)],
                         capture_output=True, text=True, env=worker.env, timeout=60)
    assert out.returncode == 1 and "Not a directory" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_status_says_why_a_job_waits_and_when_no_supervisor_serves(make_worker) -> None:
    w = make_worker(env={"GUESTKIT_WORKER_RETRY_BACKOFF": "60"}).start()
    w.drop(job("backing-off", "test.retry", {"succeed_on": 2}, max_attempts=2))
    wait_until(lambda: "retrying in 60.0 s" in w.log(), [w.base], 20, "the first attempt to fail")
    # its status says so just after that line
    wait_until(lambda: '"attempt": 2' in w.cli("status", "backing-off").stdout, [w.jobs / ".status"],
               20, "the second attempt to be queued")
    out = w.cli("status")
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("backing-off"))
    assert "queued" in line and "2/2" in line and "retry at " in line, line
    assert "no supervisor serves" not in out.stderr
    assert w.stop() == 0
    out = w.cli("status")
    assert f"note: no supervisor serves {w.jobs} now" in out.stderr, out.stderr


def test_submit_and_cancel_say_when_no_supervisor_serves_the_spool(make_worker) -> None:
    w = make_worker()
    assert not w.jobs.exists()
    for command in ("status", "list"):
        out = w.cli(command, check=False)
        assert out.returncode == 1 and f"Error: no spool at {w.jobs}: no such directory (see " \
            "--jobs-dir" in out.stderr
    for out in (w.cli("submit", "-o", "system.echo", "--job-id", "unserved"),
                w.cli("cancel", "unserved"), w.cli("status"), w.cli("list")):
        assert f"note: no supervisor serves {w.jobs} now" in out.stderr, out.stderr
    w.start()
    assert w.wait_result("unserved")["status"] == "cancelled"
    out = w.cli("submit", "-o", "system.echo", "--job-id", "served")
    assert out.stderr == "" and out.stdout == "submitted served\n"


def test_submit_wait_timeout_gives_up_and_leaves_the_job_submitted(make_worker) -> None:
    w = make_worker()  # nobody serves the spool: the job cannot end
    out = w.cli("submit", "-o", "system.echo", "--job-id", "patient", "--wait-timeout", "0.5",
                check=False)
    assert out.returncode == 124, out.stdout + out.stderr
    assert out.stderr.splitlines()[-1] == ("patient: gave up waiting (--wait-timeout); the job "
                                           "stays submitted, as last seen: pending")
    assert (w.jobs / "patient.json").exists()
    w.start()
    out = w.cli("submit", "-o", "system.echo", "--job-id", "prompt", "--wait-timeout", "60")
    assert '"status": "completed"' in out.stdout
    assert w.wait_result("patient")["status"] == "completed"


def test_start_names_its_directories_and_the_operations_it_lacks(make_worker) -> None:
    w = make_worker("--work-dir", "here-work", "--output-dir", "here-outputs",
                    env={"GKW_TEST_ABSENT": "needs the optional extra: pip install absent"})
    w.start()  # the later flags win: work and outputs are relative to its directory
    assert (f"INFO directories: jobs {w.jobs}, results {w.results}, work {w.base}/here-work, "
            f"outputs {w.base}/here-outputs") in w.log()
    assert ("WARNING operation test.absent is not available here (its jobs fail "
            "UNSUPPORTED_OPERATION): needs the optional extra: pip install absent") in w.log()
    w.drop(job("wants-absent", "test.absent", {}))
    assert w.wait_result("wants-absent")["error"]["code"] == "UNSUPPORTED_OPERATION"


def test_client_mistakes_are_refused_not_guessed_at(worker: Worker, tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    path.write_bytes(orjson.dumps(job("from-file-only")))
    out = worker.cli("submit", str(path), "-o", "system.sleep", "-d", '{"seconds": 1}',
                     check=False)
    assert out.returncode == 2 and "give a job FILE or --operation/--data/--payload-type, " \
        "not both" in out.stderr
    out = worker.cli("submit", "-o", "system.echo", "--job-id", "", check=False)
    assert out.returncode == 2 and "Invalid value for '--job-id': expected 1-128" in out.stderr
    assert not list(worker.jobs.glob("*.json"))
    worker.drop(job("never-ran", timeout_seconds=0))
    worker.wait_result("never-ran")
    out = worker.cli("logs", "never-ran", check=False)
    assert out.returncode == 1
    assert "job 'never-ran' never ran (it ended failed before it started)" in out.stderr


def test_a_reader_that_stops_reading_ends_the_command_quietly(worker: Worker) -> None:
    """`status | head -1`: no traceback nor error line; it ends as SIGPIPE would end it."""
    client = subprocess.Popen(
        [sys.executable, "-m", "worker", "status", "--jobs-dir", str(worker.jobs),
         "--results-dir", str(worker.results)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=worker.env)
    assert client.stdout is not None
    client.stdout.close()  # before it has written anything: it starts in about 0.2 s
    _, err = client.communicate(timeout=60)
    assert (client.returncode, err) == (141, b"")


def test_the_built_in_sleep_job_reports_progress_and_can_be_cancelled(worker: Worker) -> None:
    out = worker.cli("submit", "-o", "system.sleep", "-d", '{"seconds": 1.5}', "--job-id",
                     "nap", "--wait")
    assert orjson.loads(out.stdout.split("\n", 1)[1])["data"] == {"slept_seconds": 1.5}
    assert "[nap] execution - slept 1 of 1.5 s (66%)" in worker.log()
    worker.cli("submit", "-o", "system.sleep", "-d", '{"seconds": 600}', "--job-id", "long-nap")
    wait_until(lambda: "[long-nap] execution - slept 1 of 600 s" in worker.log(), [worker.base], 20)
    napping = next(p for p in worker.children() if p.name() == "gkw-job")
    assert napping.parent().name() == "gkw-forker"  # a plain job: not the warm zygote's
    worker.cli("cancel", "long-nap")
    assert worker.wait_result("long-nap")["status"] == "cancelled"
    worker.cli("submit", "-o", "system.sleep", "-d", '{"seconds": -1}', "--job-id", "bad-nap")
    err = worker.wait_result("bad-nap")["error"]
    assert err["code"] == "VALIDATION_ERROR" and err["message"] == (
        "job 'bad-nap': field 'payload.data.seconds': expected a number from 0 to 86400, got -1")


def test_submit_wait_reports_a_duplicate_of_a_running_job_as_rejected(worker: Worker) -> None:
    """Each waiting client learns the fate of its own file: the one whose job runs is not
    told of the duplicate's rejection."""
    first = subprocess.Popen(
        [sys.executable, "-m", "worker", "submit", *_dirs(worker), "-o", "system.sleep", "-d",
         '{"seconds": 600}', "--job-id", "busy-id", "--wait"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker.env)
    wait_until(lambda: "[busy-id] running" in worker.log(), [worker.base], 20)
    out = worker.cli("submit", "-o", "system.echo", "--job-id", "busy-id", "--wait", check=False)
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1].startswith(
        "busy-id: rejected: job 'busy-id': field 'job_id': duplicate"), out.stderr
    worker.cli("cancel", "busy-id")
    _, err = first.communicate(timeout=30)
    assert first.returncode == 1 and err.splitlines()[-1] == "busy-id: cancelled", err


def test_submit_keeps_a_job_within_max_job_bytes_or_refuses_it(worker: Worker, tmp_path: Path) -> None:
    """Indented only where that fits: a file `validate` passes is never made too big."""
    items = [{"k": i} for i in range(60_000)]  # about 0.6 MiB compact, over 1 MiB indented
    fits = tmp_path / "fits.json"
    fits.write_bytes(orjson.dumps(job("fits", data={"items": items})))
    assert worker.cli("validate", str(fits)).stdout.endswith("OK (fits, system.echo)\n")
    out = worker.cli("submit", str(fits), "--wait")
    assert '"status": "completed"' in out.stdout
    assert (worker.jobs / "done" / "fits.json").stat().st_size <= 1 << 20
    huge = tmp_path / "huge.json"
    huge.write_bytes(orjson.dumps(job("huge", data={"pad": "x" * (1 << 20)})))
    out = worker.cli("submit", str(huge), check=False)
    assert out.returncode == 1
    assert "Error: job 'huge': is 1048" in out.stderr
    assert "over the limit of 1048576 bytes (max_job_bytes)" in out.stderr
    assert not (worker.jobs / "huge.json").exists()


def test_submit_wait_reports_a_file_rejected_without_a_job_id(worker: Worker, tmp_path: Path) -> None:
    """Over max_job_bytes the supervisor reads nothing of it, not even its id (here the
    client's own limit is higher than the worker's)."""
    path = tmp_path / "huge.json"
    path.write_bytes(orjson.dumps(job("huge", data={"pad": "x" * (1 << 20)})))
    out = worker.cli("submit", str(path), "--wait", check=False,
                     env={"GUESTKIT_WORKER_MAX_JOB_BYTES": str(4 << 20)})
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1].startswith("huge: rejected: job file huge.json: is "), \
        out.stderr


def _dirs(w: Worker) -> list[str]:
    return ["--jobs-dir", str(w.jobs), "--results-dir", str(w.results), "--work-dir", str(w.work)]


def test_status_and_result_name_a_file_rejected_before_its_id_was_read(worker: Worker) -> None:
    worker.drop(b'{"job_id": "torn-1", "version": ', "torn-1.json")  # cut short: no id to read
    wait_until(lambda: (worker.jobs / "rejected" / "torn-1.json.error.json").exists(),
               [worker.jobs / "rejected"], 30, "the rejection record")
    for command in ("status", "result"):
        out = worker.cli(command, "torn-1", check=False)
        assert out.returncode == 1
        assert out.stderr.startswith("Error: job 'torn-1': its file torn-1.json was rejected "
                                     "unrun: job file torn-1.json: not valid JSON"), out.stderr
        assert "torn-1.json.error.json)" in out.stderr
