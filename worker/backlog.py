"""The backlog: queued jobs beyond the supervisor's window, held in about 80 bytes each.

A queued job held as a Job costs the supervisor about 800 bytes of heap, and a heap that
once held 100,000 of them stays large after they are gone. The backlog keeps only what
finds a job again: per priority, one lane of packed records (claimed file name and job id)
with their ranks in typed arrays, in arrival order, plus a table of 31-bit job-id keys for
the duplicate check. The job itself is read back from its claimed file when it reaches the
front. A lane gives back the space of what left its front as it goes, and all of it when
the backlog empties.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

_RECLAIM = 4096  # entries gone from a lane's front before their space is given back


@dataclass(frozen=True, slots=True)
class Entry:
    """One job as the backlog gives it back."""

    job_id: str
    claimed: str
    priority: int
    seq: int  # its rank among jobs of equal priority (the supervisor's arrival counter)
    attempt: int | None  # the attempt it was queued for, when not its document's own


def _pack(claimed: str, job_id: str) -> bytes:
    """One record: `0 claimed NUL job_id`, or `1 len(job_id) claimed` when the claimed name
    ends with `-<job_id>.json` (a file named after its job, as most are): no id twice."""
    name = claimed.encode("utf-8", "surrogateescape")
    ident = job_id.encode()
    if len(ident) < 256 and name.endswith(b"-" + ident + b".json"):
        return bytes((1, len(ident))) + name
    return b"\0" + name + b"\0" + ident


def _unpack(record: bytes) -> tuple[str, str]:
    if record[0] == 1:
        name = record[2:]
        ident = name[len(name) - 5 - record[1]:-5]
    else:
        name, ident = record[1:].split(b"\0", 1)
    return name.decode("utf-8", "surrogateescape"), ident.decode()


class _Lane:
    """The jobs of one priority in arrival order, each record packed by `_pack`."""

    __slots__ = ("alive", "head", "offset", "seqs", "sizes", "text")

    def __init__(self) -> None:
        self.text = bytearray()
        self.sizes = array("H")
        self.seqs = array("I")
        self.alive = bytearray()
        self.head = 0  # index of the first entry not yet gone from the front
        self.offset = 0  # where that entry's record starts in text

    def push(self, record: bytes, seq: int) -> None:
        self.text += record
        self.sizes.append(len(record))
        self.seqs.append(seq)
        self.alive.append(1)

    def front(self) -> int | None:
        """Index of the first live entry (dropping dead ones before it); None when empty."""
        while self.head < len(self.sizes) and not self.alive[self.head]:
            self.offset += self.sizes[self.head]
            self.head += 1
        if self.head >= _RECLAIM and self.head * 2 >= len(self.sizes):
            del self.text[:self.offset], self.sizes[:self.head], self.seqs[:self.head]
            del self.alive[:self.head]
            self.head = self.offset = 0
        return self.head if self.head < len(self.sizes) else None

    def record(self, index: int, offset: int) -> tuple[str, str]:
        return _unpack(bytes(self.text[offset:offset + self.sizes[index]]))

    def find(self, job_id: str) -> tuple[int, int] | None:
        """(index, offset) of the live entry for `job_id`: a walk of the lane (cancel only)."""
        index, offset = self.head, self.offset
        while index < len(self.sizes):
            if self.alive[index] and self.record(index, offset)[1] == job_id:
                return index, offset
            index, offset = index + 1, offset + self.sizes[index]
        return None


class Backlog:
    """Queued jobs by priority, then arrival; `best()` and `pop()` give the front one."""

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self._lanes: dict[int, _Lane] = {}
        self._ids = array("i", [0]) * 8  # 31-bit id keys, open addressing: 0 free, -1 removed
        self._used = 0  # slots not free
        self._count = 0
        self._base: int | None = None  # seqs are stored as seq - base
        self._attempts: dict[int, int] = {}  # seq -> attempt, for the few that need one

    def __len__(self) -> int:
        return self._count

    def __contains__(self, job_id: object) -> bool:
        """Whether a job with this id is held: a 31-bit key of the id rules out nearly every
        new id at once; a key that matches is confirmed by reading the lanes (a true
        duplicate, or about one new id in 20,000 with 100,000 held)."""
        return (isinstance(job_id, str) and self._slot(_key(job_id)) >= 0
                and self._locate(job_id) is not None)

    def add(self, job_id: str, claimed: str, priority: int, seq: int,
            attempt: int | None = None) -> bool:
        """Hold a queued job; False (nothing held) when it cannot be: keep it as it is."""
        if self._base is None:
            self._base = seq
        record = _pack(claimed, job_id)
        if not 0 <= seq - self._base < 1 << 32 or len(record) >= 1 << 16:
            return False
        self._lanes.setdefault(priority, _Lane()).push(record, seq - self._base)
        if attempt is not None:
            self._attempts[seq] = attempt
        self._count += 1
        self._insert(_key(job_id))
        return True

    def best(self) -> tuple[int, int] | None:
        """The front job's rank as the supervisor's heap orders it: (-priority, seq)."""
        for priority in sorted(self._lanes, reverse=True):
            lane = self._lanes[priority]
            index = lane.front()
            if index is not None:
                assert self._base is not None
                return -priority, lane.seqs[index] + self._base
        return None

    def pop(self) -> Entry | None:
        """Remove and return the front job (highest priority, then first to arrive)."""
        for priority in sorted(self._lanes, reverse=True):
            lane = self._lanes[priority]
            index = lane.front()
            if index is not None:
                return self._remove(priority, index, lane.offset)
        return None

    def take(self, job_id: str) -> Entry | None:
        """Remove and return the job `job_id` wherever it is (to cancel it); None if absent."""
        if self._slot(_key(job_id)) < 0:
            return None
        found = self._locate(job_id)
        return None if found is None else self._remove(*found)

    def _locate(self, job_id: str) -> tuple[int, int, int] | None:
        """(priority, index, offset) of `job_id`: a walk of the lanes, for the rare match."""
        for priority, lane in self._lanes.items():
            found = lane.find(job_id)
            if found is not None:
                return priority, *found
        return None

    def oldest(self) -> str | None:
        """The claimed name of the job that arrived first (for the queue-age gauge)."""
        heads = [(lane.seqs[i], lane, i) for lane in self._lanes.values()
                 if (i := lane.front()) is not None]
        if not heads:
            return None
        _, lane, index = min(heads, key=lambda h: h[0])
        return lane.record(index, lane.offset)[0]

    def _remove(self, priority: int, index: int, offset: int) -> Entry:
        lane = self._lanes[priority]
        claimed, job_id = lane.record(index, offset)
        lane.alive[index] = 0
        self._ids[self._slot(_key(job_id))] = -1  # one of the entries with this key
        self._count -= 1
        assert self._base is not None
        seq = lane.seqs[index] + self._base
        out = Entry(job_id, claimed, priority, seq, self._attempts.pop(seq, None))
        if not self._count:
            self._clear()  # give every buffer back
        return out

    def _slot(self, key: int) -> int:
        """A slot holding `key` (keys may repeat: ids are not), or -1."""
        mask = len(self._ids) - 1
        slot = key & mask
        while (held := self._ids[slot]) != 0:
            if held == key:
                return slot
            slot = (slot + 1) & mask
        return -1

    def _insert(self, key: int) -> None:
        if (self._used + 1) * 3 > len(self._ids) * 2:
            self._rehash()
        mask = len(self._ids) - 1
        slot = key & mask
        while self._ids[slot] > 0:  # the first free or removed slot
            slot = (slot + 1) & mask
        if self._ids[slot] == 0:
            self._used += 1
        self._ids[slot] = key

    def _rehash(self) -> None:
        old = self._ids
        size = 8
        while size < (self._count + 1) * 2:  # half full after growing, two thirds at most
            size *= 2
        self._ids, self._used = array("i", [0]) * size, 0
        for key in old:
            if key > 0:
                self._insert(key)


def _key(job_id: str) -> int:
    """A positive 31-bit key: str hashes are keyed per process (PYTHONHASHSEED)."""
    return (hash(job_id) & 0x7FFFFFFF) or 1
