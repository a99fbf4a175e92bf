"""inotify on the inbox: names of files closed after writing or moved in; overflow means rescan."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from inotify_simple import INotify, flags

_MASK = flags.CLOSE_WRITE | flags.MOVED_TO | flags.CREATE


@dataclass(frozen=True, slots=True)
class Change:
    """One event: `name` in the watched dir `where`; `created` means it may still be open."""

    where: str
    name: str
    created: bool


class Watch:
    """Watches directories, reporting complete files; `overflowed` tells the caller to rescan."""

    def __init__(self) -> None:
        self._ino = INotify(nonblocking=True)
        self._dirs: dict[int, str] = {}
        self.overflowed = False

    def add(self, label: str, path: Path) -> None:
        """Start watching `path`, reporting its events under `label`."""
        wd = self._ino.add_watch(str(path), _MASK)
        self._dirs[wd] = label

    def fileno(self) -> int:
        """The fd to register with the selector."""
        return int(self._ino.fileno())

    def read(self) -> list[Change]:
        """Return the pending changes; sets `overflowed` when the kernel queue overflowed."""
        out: list[Change] = []
        try:
            events = self._ino.read(timeout=0)
        except BlockingIOError:
            return out
        for ev in events:
            if ev.mask & flags.Q_OVERFLOW:
                self.overflowed = True
                continue
            where = self._dirs.get(ev.wd)
            if where is None or not ev.name:
                continue
            out.append(Change(where, ev.name, bool(ev.mask & flags.CREATE)))
        return out

    def close(self) -> None:
        """Stop watching."""
        self._ino.close()
