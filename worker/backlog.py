"""The backlog: queued jobs beyond the supervisor's window, held in about 80 bytes each.

A queued job held as a Job costs the supervisor about 800 bytes of heap, and a heap that
once held 100,000 of them stays large after they are gone. The backlog keeps only what
finds a job again: per priority, one lane of packed records (claimed file name and job id)
with their ranks in typed arrays, in arrival order and in chunks of _CHUNK, plus a table of
31-bit job-id keys for the duplicate check. The job itself is read back from its claimed
file when it reaches the front. A lane gives back each chunk once all of it has left, and
everything when the backlog empties.
"""

from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass

_CHUNK = 1024  #: entries per chunk of a lane


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


class _Chunk:
    """Up to _CHUNK records of a lane, packed by `_pack`, with their ranks and liveness."""

    __slots__ = ("alive", "seqs", "sizes", "text")

    def __init__(self) -> None:
        self.text = bytearray()
        self.sizes = array("H")
        self.seqs = array("I")
        self.alive = bytearray()

    def record(self, index: int, offset: int) -> tuple[str, str]:
        """(claimed name, job id) of entry `index`, whose record starts at `offset`."""
        return _unpack(bytes(self.text[offset:offset + self.sizes[index]]))


#: Where an entry is: its chunk, its index there and its record's offset in the chunk's text.
_Pos = tuple[_Chunk, int, int]


class _Lane:
    """The jobs of one priority in arrival order, in chunks freed as the front passes them.

    A lane fed as fast as it drains holds its live entries and two chunks more (a taken
    entry's chunk waits for the front), and no buffer the size of the lane is ever copied.
    """

    __slots__ = ("chunks", "head", "offset")

    def __init__(self) -> None:
        self.chunks: deque[_Chunk] = deque()
        self.head = 0  # index in the first chunk of the first entry not yet gone
        self.offset = 0  # where that entry's record starts in the chunk's text

    def push(self, record: bytes, seq: int) -> None:
        if not self.chunks or len(self.chunks[-1].sizes) >= _CHUNK:
            self.chunks.append(_Chunk())
        chunk = self.chunks[-1]
        chunk.text += record
        chunk.sizes.append(len(record))
        chunk.seqs.append(seq)
        chunk.alive.append(1)

    def front(self) -> _Pos | None:
        """The first live entry (dropping dead ones and spent chunks before it), or None."""
        while self.chunks:
            chunk = self.chunks[0]
            size = len(chunk.sizes)
            while self.head < size and not chunk.alive[self.head]:
                self.offset += chunk.sizes[self.head]
                self.head += 1
            if self.head < size:
                return chunk, self.head, self.offset
            if size < _CHUNK:  # the last chunk, still filling: new entries come after head
                return None
            self.chunks.popleft()
            self.head = self.offset = 0
        return None

    def find(self, job_id: str) -> _Pos | None:
        """Where the live entry for `job_id` is: a walk of the lane (cancel only)."""
        for i, chunk in enumerate(self.chunks):
            index, offset = (self.head, self.offset) if i == 0 else (0, 0)
            while index < len(chunk.sizes):
                if chunk.alive[index] and chunk.record(index, offset)[1] == job_id:
                    return chunk, index, offset
                index, offset = index + 1, offset + chunk.sizes[index]
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
            pos = self._lanes[priority].front()
            if pos is not None:
                assert self._base is not None
                return -priority, pos[0].seqs[pos[1]] + self._base
        return None

    def pop(self) -> Entry | None:
        """Remove and return the front job (highest priority, then first to arrive)."""
        for priority in sorted(self._lanes, reverse=True):
            pos = self._lanes[priority].front()
            if pos is not None:
                return self._remove(priority, pos)
        return None

    def take(self, job_id: str) -> Entry | None:
        """Remove and return the job `job_id` wherever it is (to cancel it); None if absent."""
        if self._slot(_key(job_id)) < 0:
            return None
        found = self._locate(job_id)
        return None if found is None else self._remove(*found)

    def _locate(self, job_id: str) -> tuple[int, _Pos] | None:
        """(priority, where) of `job_id`: a walk of the lanes, for the rare match."""
        for priority, lane in self._lanes.items():
            found = lane.find(job_id)
            if found is not None:
                return priority, found
        return None

    def oldest(self) -> str | None:
        """The claimed name of the job that arrived first (for the queue-age gauge)."""
        heads = [pos for lane in self._lanes.values() if (pos := lane.front()) is not None]
        if not heads:
            return None
        chunk, index, offset = min(heads, key=lambda pos: pos[0].seqs[pos[1]])
        return chunk.record(index, offset)[0]

    def _remove(self, priority: int, pos: _Pos) -> Entry:
        chunk, index, offset = pos
        claimed, job_id = chunk.record(index, offset)
        chunk.alive[index] = 0
        self._ids[self._slot(_key(job_id))] = -1  # one of the entries with this key
        self._count -= 1
        assert self._base is not None
        seq = chunk.seqs[index] + self._base
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
