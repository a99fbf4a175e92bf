"""A worker's profile: what it shows other workers, and how a job's constraints are judged on it."""

from __future__ import annotations

import orjson

from worker import config, routing
from worker.spec import JobDocument, parse_job


def _doc(constraints: dict[str, object]) -> JobDocument:
    raw = orjson.dumps({"version": "1.0", "job_id": "r-1", "kind": "VMOperation",
                        "operation": "system.echo", "constraints": constraints,
                        "payload": {"type": "system.echo.v1", "data": {"message": "x"}}})
    return parse_job(raw, "r-1")[0]


def test_a_profile_read_back_from_its_json_judges_jobs_as_the_worker_itself_does() -> None:
    settings = config.Settings(worker_id="w-7", features=["lvm"], labels={"zone": "eu"})
    mine = routing.Profile.of(settings, {"system.echo"}, {"selinux"}, "1.4.0")
    seen = routing.Profile.from_json(orjson.loads(orjson.dumps(mine.to_json())))
    assert seen == mine
    assert mine.features == {"lvm", "selinux"} and mine.labels["zone"] == "eu"
    assert routing.unsatisfied(_doc({"required_features": ["lvm", "selinux"]}), seen) is None
    assert routing.unsatisfied(_doc({"required_features": ["gpu"]}), seen, "worker 'w-7'") == \
        "constraints.required_features: worker 'w-7' lacks ['gpu']"
    assert routing.unsatisfied(_doc({"minimum_worker_version": "1.10"}), seen) == \
        "constraints.minimum_worker_version is 1.10; this worker is 1.4.0"


def test_what_is_no_profile_reads_as_none() -> None:
    good = routing.Profile.of(config.Settings(), set(), set(), "1.0").to_json()
    for bad in (None, [], "w", {**good, "labels": ["x"]}, {k: v for k, v in good.items()
                                                           if k != "features"}):
        assert routing.Profile.from_json(bad) is None
