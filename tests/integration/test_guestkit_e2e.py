"""guestkit jobs through the real supervisor and sandbox, on disk images built at test time."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest
from conftest import EXAMPLES, Worker, job

from handlers.guestkit_inspect import InspectHandler

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(InspectHandler.unavailable_reason() is not None,
                       reason=str(InspectHandler.unavailable_reason())),
]


@pytest.fixture
def gk(make_worker, images: Path) -> Worker:
    """A worker whose only image root is the fixture images."""
    os.chmod(images, 0o755)
    return make_worker("--image-root", str(images), "--kill-grace", "1").start()


def _inspect(job_id: str, path: Path, **data) -> dict:
    return job(job_id, "guestkit.inspect", {"image": {"path": str(path), "format": "qcow2"}, **data})


def test_inspect_reports_the_planted_guest_from_inside_the_sandbox(gk: Worker, images: Path) -> None:
    gk.drop(_inspect("insp", images / "deb-gpt.qcow2"))
    res = gk.wait_result("insp", timeout=120)
    assert res["status"] == "completed", res["error"]
    summary = res["data"]["inspect"]
    assert summary["operating_system"]["distribution"] == "debian"
    assert summary["operating_system"]["hostname"]
    report = orjson.loads(Path(res["outputs"]["primary"]).read_bytes())
    assert report["packages"]["count"] > 0 and report["users"]["count"] > 0
    assert "network-namespace" in res["isolation"]  # inspect needs no network
    assert res["metrics"]["peak_memory_mb"] > 0


def test_profile_finds_the_planted_weaknesses(gk: Worker, images: Path) -> None:
    doc = job("prof", "guestkit.profile", {"image": {"path": str(images / "deb-gpt.qcow2")},
                                           "profiles": ["security", "compliance", "hardening"]})
    gk.drop(doc)
    res = gk.wait_result("prof", timeout=120)
    assert res["status"] == "completed", res["error"]
    assert res["data"]["summary"]["total_findings"] == 10
    ids = {f["id"] for f in res["data"]["findings"]}
    assert {"CIS-AUTH-001", "CIS-SSH-001", "CIS-SSH-002"} <= ids
    assert {"user:65534", "landlock-abi7", "seccomp"} <= set(res["isolation"])


def test_convert_round_trips_through_the_worker(gk: Worker, images: Path) -> None:
    doc = job("conv", "guestkit.convert", {"image": {"path": str(images / "deb-mbr.qcow2")},
                                           "target": {"format": "raw", "name": "deb-mbr.raw"}})
    gk.drop(doc)
    res = gk.wait_result("conv", timeout=120)
    assert res["status"] == "completed", res["error"]
    out = Path(res["outputs"]["primary"])
    assert out.parent == gk.outputs
    cmp = subprocess.run(["qemu-img", "compare", str(images / "deb-mbr.qcow2"), str(out)],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def test_a_corrupt_image_fails_its_job_while_others_succeed(gk: Worker, images: Path) -> None:
    gk.drop(_inspect("bad-rand", images / "random.img"))
    gk.drop(_inspect("bad-trunc", images / "truncated.qcow2"))
    gk.drop(_inspect("good", images / "deb-mbr.qcow2"))
    gk.drop(job("echo-beside"))
    for bad in ("bad-rand", "bad-trunc"):
        res = gk.wait_result(bad, timeout=120)
        assert res["status"] == "failed"
        assert res["error"]["code"] == "EXECUTION_ERROR"
        assert str(images) in res["error"]["message"]
    assert gk.wait_result("good", timeout=120)["status"] == "completed"
    assert gk.wait_result("echo-beside")["status"] == "completed"


def test_images_outside_the_roots_are_rejected_before_fork(gk: Worker, images: Path,
                                                          tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.qcow2"
    shutil.copy(images / "deb-mbr.qcow2", outside)
    escape = images / "escape.qcow2"
    escape.symlink_to(outside)
    try:
        gk.drop(_inspect("outside", outside))
        gk.drop(_inspect("symlinked", escape))
        for jid in ("outside", "symlinked"):
            res = gk.wait_result(jid)
            assert res["error"]["code"] == "VALIDATION_ERROR"
            assert "outside the allowed image roots" in res["error"]["message"]
            assert res["execution_summary"]["started_at"] is None  # never forked
            assert not (gk.work / jid).exists()
    finally:
        escape.unlink()


def test_every_example_job_ends_with_a_specific_outcome(gk: Worker) -> None:
    for path in sorted(EXAMPLES.glob("*.json")):
        shutil.copyfile(path, gk.jobs / path.name)  # written in place, no chmod after close
    expected = {
        "job-01JAB5D9XAMBNCPDQERF": "UNSUPPORTED_OPERATION",  # guestkit.fix has no handler
        "echo-test-001": None,
    }
    for path in sorted(EXAMPLES.glob("*.json")):
        jid = orjson.loads(path.read_bytes())["job_id"]
        res = gk.wait_result(jid, timeout=60)
        if jid in expected and expected[jid] is None:
            assert res["status"] == "completed"
            continue
        assert res["status"] == "failed"
        code = res["error"]["code"]
        assert code == expected.get(jid, code)
        assert code in {"UNSUPPORTED_OPERATION", "VALIDATION_ERROR", "DEADLINE_EXCEEDED"}
        assert jid in res["error"]["message"]
        if code == "VALIDATION_ERROR":
            assert "payload.data." in res["error"]["message"]


def test_an_rpm_guest_s_packages_are_read_by_the_sandboxed_job(gk: Worker, images: Path) -> None:
    """The rpmdb reader imports sqlite3 late (the supervisor never loads it); the job, which
    cannot read the interpreter's files, finds it imported by the zygote's prepare()."""
    gk.drop(_inspect("rpm", images / "rocky-xfs.qcow2"))
    res = gk.wait_result("rpm", timeout=120)
    assert res["status"] == "completed", res["error"]
    report = orjson.loads(Path(res["outputs"]["primary"]).read_bytes())
    names = {p["name"] for p in report["packages"]["packages"]}
    assert {"bash", "openssh-server", "kernel-core"} <= names, names
