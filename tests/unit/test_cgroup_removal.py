"""cgroups.remove_all: what a stop removes, on directory trees shaped like cgroup hierarchies."""

from __future__ import annotations

from pathlib import Path

from worker import cgroups


def test_job_and_slot_cgroups_go_a_delegated_units_own_cgroup_stays(tmp_path: Path) -> None:
    unit = tmp_path / "unit"
    for leaf in ("supervisor", "job-x", "slot-0"):
        (unit / leaf).mkdir(parents=True)
    assert cgroups.remove_all(cgroups.Hierarchies(v2=unit))
    assert [p.name for p in tmp_path.iterdir()] == ["unit"]
    assert [p.name for p in unit.iterdir()] == ["supervisor"]


def test_a_parent_made_for_the_spool_goes_with_its_slots(tmp_path: Path) -> None:
    parent = tmp_path / "guestkit-default-0123456789"
    (parent / "slot-1").mkdir(parents=True)
    assert cgroups.remove_all(cgroups.Hierarchies(pids_v1=parent, owned=[parent]))
    assert not parent.exists()


def test_a_cgroup_still_held_is_left_and_said(tmp_path: Path) -> None:
    parent = tmp_path / "guestkit-default-0123456789"
    held = parent / "slot-0"
    held.mkdir(parents=True)
    (held / "busy").write_text("")  # rmdir fails, as on a cgroup a process still holds
    assert not cgroups.remove_all(cgroups.Hierarchies(pids_v1=parent, owned=[parent]))
    assert held.exists() and parent.exists()
