"""The original quick start, literally, and the compatibility corpus (PROTOCOL §6)."""

from __future__ import annotations

import shutil
import subprocess

import orjson
from conftest import EXAMPLES, Worker, job, wait_until

QUICK_START = """
cat > jobs/test-job-123.json <<EOF
{
  "version": "1.0",
  "job_id": "test-job-123",
  "kind": "VMOperation",
  "operation": "system.echo",
  "payload": {
    "type": "system.echo.v1",
    "data": {"message": "Hello, World!"}
  }
}
EOF
"""


def test_original_quick_start(make_worker) -> None:
    w = make_worker()
    w.jobs.mkdir()
    w.start()
    subprocess.run(["bash", "-c", QUICK_START], cwd=w.base, check=True)
    res = w.wait_result("test-job-123")
    assert res["status"] == "completed"
    assert res["data"]["echo"] == {"message": "Hello, World!"}
    assert res["error"] is None
    assert res["metrics"]["peak_memory_mb"] > 0
    assert "[test-job-123] execution - Running operation (50%)" in w.log()
    # the job file is archived right after its result is durable (same loop pass)
    wait_until(lambda: not any((w.jobs / ".active").iterdir()), [w.jobs / ".active"], 10,
               "every job file to be archived")
    assert (w.jobs / "done" / "test-job-123.json").exists()


def test_every_example_ends_with_a_clear_outcome(worker: Worker) -> None:
    for path in sorted(EXAMPLES.glob("*.json")):
        shutil.copyfile(path, worker.jobs / path.name)  # written in place, no chmod after close
    ids = {orjson.loads(p.read_bytes())["job_id"] for p in EXAMPLES.glob("*.json")}
    for job_id in ids:
        res = worker.wait_result(job_id)
        if job_id == "echo-test-001":
            assert res["status"] == "completed"
            assert res["data"]["echo"]["test_data"]["nested"]["value"] == 42
            continue
        assert res["status"] == "failed"
        err = res["error"]
        assert err["code"] in {"UNSUPPORTED_OPERATION", "VALIDATION_ERROR", "DEADLINE_EXCEEDED"}
        assert job_id in err["message"]
        if job_id == "job-01JAB5D9XAMBNCPDQERF":
            assert err["code"] == "UNSUPPORTED_OPERATION"
            assert "guestkit.fix" in err["message"]
    # two examples share a job_id: exactly one of them ran, the other was moved aside
    rejected = list((worker.jobs / "rejected").glob("*.error.json"))
    assert len(rejected) == 1
    reason = orjson.loads(rejected[0].read_bytes())
    assert "duplicate" in reason["message"] and reason["job_id"] == "job-01JAB3Y7X5K4M8F9W2T6"
    assert worker.proc.poll() is None


def test_examples_validate_offline(worker: Worker) -> None:
    out = worker.cli("validate", *map(str, sorted(EXAMPLES.glob("*.json"))), check=False)
    assert "worker-jobs_echo-test.json: OK (echo-test-001, system.echo)" in out.stdout
    assert "jobs_fix-offline.json: INVALID UNSUPPORTED_OPERATION" in out.stdout
    assert out.returncode == 1  # the guestkit.fix example cannot run on any worker


def test_thousand_jobs_at_once_each_get_exactly_one_result(make_worker) -> None:
    w = make_worker("--no-fsync")
    w.jobs.mkdir(parents=True)
    staging = w.base / "staging"
    staging.mkdir()
    for i in range(1000):
        (staging / f"bulk-{i:04d}.json").write_bytes(orjson.dumps(job(f"bulk-{i:04d}")))
    w.start()
    for p in staging.iterdir():
        p.rename(w.jobs / p.name)
    w.wait_results(1000, timeout=240)
    results = sorted(w.published())
    assert results == [f"bulk-{i:04d}-result.json" for i in range(1000)]
    wait_until(lambda: len(list((w.jobs / "done").iterdir())) == 1000, [w.jobs / "done"], 30,
               "1000 archived job files")
    assert all(w.result(f"bulk-{i:04d}")["status"] == "completed" for i in range(0, 1000, 97))
    assert w.stop() == 0
