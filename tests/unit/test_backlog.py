"""The backlog keeps queued jobs compactly and gives them back in the heap's order."""

from __future__ import annotations

import heapq
import random

from worker.backlog import _CHUNK, Backlog


def _fill(b: Backlog, jobs: list[tuple[str, int]]) -> None:
    for seq, (job_id, priority) in enumerate(jobs):
        assert b.add(job_id, f"{seq:020d}-000001-{job_id}.json", priority, seq)


def test_it_gives_jobs_back_by_priority_then_arrival_as_the_heap_would() -> None:
    rng = random.Random(7)
    jobs = [(f"job-{i}", rng.randint(1, 10)) for i in range(3000)]
    b = Backlog()
    _fill(b, jobs)
    heap = [(-p, seq, job_id) for seq, (job_id, p) in enumerate(jobs)]
    heapq.heapify(heap)
    while heap:
        want = heapq.heappop(heap)
        assert b.best() == want[:2]
        got = b.pop()
        assert got is not None and (-got.priority, got.seq, got.job_id) == want
        assert got.claimed == f"{got.seq:020d}-000001-{got.job_id}.json"
    assert len(b) == 0 and b.best() is None and b.pop() is None


def test_it_knows_which_ids_it_holds_and_gives_up_one_on_request() -> None:
    b = Backlog()
    _fill(b, [("a", 5), ("b", 5), ("c", 5)])
    assert "b" in b and "z" not in b and len(b) == 3
    taken = b.take("b")
    assert taken is not None and taken.job_id == "b" and taken.seq == 1
    assert "b" not in b and b.take("b") is None and len(b) == 2
    assert [b.pop().job_id, b.pop().job_id] == ["a", "c"]  # type: ignore[union-attr]


def test_an_id_can_come_back_once_it_left() -> None:
    b = Backlog()
    _fill(b, [("again", 3)])
    assert b.pop() is not None
    assert "again" not in b
    assert b.add("again", "x.json", 3, 10)
    assert "again" in b


def test_odd_file_names_and_attempts_come_back_unchanged() -> None:
    b = Backlog()
    name = "caf\udce9-\u00e9t\u00e9.json"  # a non-UTF-8 byte as os.listdir gives it
    assert b.add("id-1", name, 5, 1, attempt=3)
    assert b.add("id-2", "plain.json", 5, 2)
    first, second = b.pop(), b.pop()
    assert first is not None and (first.claimed, first.attempt) == (name, 3)
    assert second is not None and second.attempt is None


def _held(b: Backlog, priority: int) -> tuple[int, int]:
    """(chunks, bytes of records) a lane holds."""
    chunks = b._lanes[priority].chunks
    return len(chunks), sum(len(c.text) for c in chunks)


def test_space_of_jobs_gone_from_the_front_is_given_back() -> None:
    b = Backlog()
    _fill(b, [(f"j{i}", 5) for i in range(20_000)])
    _, size = _held(b, 5)
    for _ in range(15_000):
        assert b.pop() is not None
    b.best()
    chunks, left = _held(b, 5)
    assert chunks <= 5_000 // _CHUNK + 2 and left < size * 0.3
    for _ in range(5_000):
        assert b.pop() is not None
    assert b._lanes == {} and len(b._ids) == 8  # empty: every buffer given back


def test_a_steady_deep_backlog_holds_its_live_jobs_and_at_most_two_chunks_more() -> None:
    b = Backlog()
    depth = 10 * _CHUNK
    _fill(b, [(f"j{i}", 5) for i in range(depth)])
    most = 0
    for i in range(depth, 4 * depth):  # one in, one out, as a feeder keeps the depth
        assert b.add(f"j{i}", f"{i:020d}-000000-j{i}.json", 5, i)
        popped = b.pop()
        assert popped is not None and popped.job_id == f"j{i - depth}"
        most = max(most, _held(b, 5)[0])
    assert most <= depth // _CHUNK + 2


def test_a_rank_too_far_from_the_first_is_refused_not_wrapped() -> None:
    b = Backlog()
    assert b.add("first", "a.json", 5, 100)
    assert not b.add("far", "b.json", 5, 100 + (1 << 32))
    assert "far" not in b and len(b) == 1


def test_ids_that_share_a_key_are_told_apart(monkeypatch) -> None:
    monkeypatch.setattr("worker.backlog._key", lambda job_id: 7)  # every id collides
    b = Backlog()
    _fill(b, [("x", 5), ("y", 5), ("z", 2)])
    assert "y" in b and "w" not in b
    taken = b.take("y")
    assert taken is not None and taken.job_id == "y"
    assert "x" in b and "y" not in b and "z" in b and b.take("w") is None
    assert [b.pop().job_id, b.pop().job_id] == ["x", "z"]  # type: ignore[union-attr]
    assert "x" not in b and len(b) == 0


def test_small_chunks_keep_the_order_through_cancels_anywhere(monkeypatch) -> None:
    monkeypatch.setattr("worker.backlog._CHUNK", 4)  # every lane spans many chunks
    rng = random.Random(11)
    jobs = [(f"job-{i}", rng.randint(1, 3)) for i in range(300)]
    b = Backlog()
    _fill(b, jobs)
    taken = set(rng.sample([j for j, _ in jobs], 100))
    for job_id in sorted(taken):
        entry = b.take(job_id)
        assert entry is not None and entry.job_id == job_id
        assert job_id not in b
    want = [j for _, _, j in sorted((-p, seq, j) for seq, (j, p) in enumerate(jobs)
                                    if j not in taken)]
    got = []
    while (entry := b.pop()) is not None:
        got.append(entry.job_id)
    assert got == want and len(b) == 0


def test_a_lane_whose_full_last_chunk_was_taken_takes_new_jobs_in_order(monkeypatch) -> None:
    monkeypatch.setattr("worker.backlog._CHUNK", 4)
    b = Backlog()
    _fill(b, [(f"j{i}", 5) for i in range(8)])  # two full chunks
    for i in range(4, 8):
        assert b.take(f"j{i}") is not None  # the whole last chunk is dead
    for i in range(3):
        entry = b.pop()
        assert entry is not None and entry.job_id == f"j{i}"
    for seq in (8, 9):
        assert b.add(f"j{seq}", f"{seq:020d}-000001-j{seq}.json", 5, seq)
    assert [e.job_id for e in iter(b.pop, None)] == ["j3", "j8", "j9"]
