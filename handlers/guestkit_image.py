"""What the guestkit handlers share: the image payload, path roots, checksums, opening a guest.

A guest is opened once per job, read-only, as one anonymous byte stream per image file,
so the reader can follow no file reference of its own: a qcow2 backing chain is the only
reference honoured, and each of its files must resolve inside the image roots too.
The inspection library (dissect.target, the `guestkit` extra) is imported lazily; this
module itself is safe to import in the supervisor.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import importlib
import importlib.util
import io
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel, ConfigDict, field_validator

from handlers.base import Context
from handlers.guestkit_facts import GuestFacts
from handlers.guestkit_formats import ImageProbe, normalize_format, probe_image, qcow2_backing_name
from handlers.guestkit_parsers import guest_name
from worker.errors import HandlerError

__all__ = [
    "EXTRA_HINT", "GuestImage", "ImageSpec", "OutputSpec", "anchored_settings", "chain_paths",
    "check_image_spec", "dissect_missing",
    "guest_facts", "image_roots", "image_section", "open_guest", "output_root", "resolve_within",
    "verify_checksum", "warm_up",
]

EXTRA_HINT = "pip install 'guestkit-worker[guestkit]'"
_CHECKSUM_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}
_MAX_BACKING_DEPTH = 16
_READ_LIMIT = 64 * 1024 * 1024
#: Filesystems whose mode bits mean what POSIX says (FAT/NTFS report 0777 for everything).
_POSIX_FS = frozenset({"ext", "xfs", "btrfs", "ffs", "jffs", "squashfs", "cramfs", "overlay"})
_SKIP_TREES = ("/proc", "/sys", "/dev", "/run")
_MAX_WALK_DEPTH = 256  #: directory levels the file walk descends below a filesystem's root


class _Lenient(BaseModel):
    """Base of the payload models: unknown keys are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")


class ImageSpec(_Lenient):
    """`payload.data.image`: the disk image to read (always opened read-only)."""

    path: str
    format: str | None = None
    checksum: str | None = None
    read_only: bool = True
    size_bytes: int | None = None

    @field_validator("path")
    @classmethod
    def _path_non_empty(cls, value: str) -> str:
        """Refuse an empty path or one with NUL bytes."""
        if not value.strip() or "\0" in value:
            raise ValueError("must be a non-empty path without NUL bytes")
        return value

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        """Map the declared format to its container name (unknown ones are refused)."""
        return None if value is None else normalize_format(value)


class OutputSpec(_Lenient):
    """`payload.data.output`: where the report goes (inside the output directory)."""

    format: str = "json"
    destination: str | None = None
    compression: str | None = None
    include_remediation: bool = True

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        """Only json and yaml reports."""
        if value.lower() not in ("json", "yaml"):
            raise ValueError(f"unsupported report format {value!r}; use 'json' or 'yaml'")
        return value.lower()

    @field_validator("compression")
    @classmethod
    def _known_compression(cls, value: str | None) -> str | None:
        """null, "none" or "gzip" (stored as None or "gzip")."""
        if value is not None and value.lower() not in ("none", "gzip"):
            raise ValueError(f"unsupported compression {value!r}; use null, 'none' or 'gzip'")
        return None if value is None or value.lower() == "none" else "gzip"


def anchored_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `settings` with `image_roots` and `output_dir` made absolute where the worker runs.

    Handlers are built in the supervisor; the child runs in its work dir, so relative
    roots must be fixed before the fork.
    """
    out = dict(settings)
    out["image_roots"] = [str(r) for r in image_roots(settings)]
    root = output_root(settings)
    out["output_dir"] = str(root) if root else None
    return out


def image_roots(settings: Mapping[str, Any]) -> list[Path]:
    """The configured image roots, symlinks resolved; empty when none is configured."""
    roots = settings.get("image_roots") or []
    if isinstance(roots, str):
        roots = [roots]
    return [Path(os.path.realpath(r)) for r in roots]


def output_root(settings: Mapping[str, Any]) -> Path | None:
    """The configured output directory, symlinks resolved, or None."""
    out = settings.get("output_dir")
    return Path(os.path.realpath(out)) if out else None


#: Where a worker's image roots are set, for a message saying it has none.
IMAGE_ROOTS_SETTING = "--image-root, or image_roots in its config"


def resolve_within(raw: str, roots: list[Path], field_name: str, what: str,
                   setting: str = IMAGE_ROOTS_SETTING) -> Path:
    """Resolve absolute path `raw` (symlinks followed) and require it inside one of `roots`
    (`what` they are, set with `setting`)."""
    if not roots:
        raise HandlerError(f"{field_name}: this worker has no {what} configured ({setting})")
    if not os.path.isabs(raw):
        raise HandlerError(f"{field_name}: {raw!r} must be an absolute path")
    real = Path(os.path.realpath(raw))
    if any(real == root or root in real.parents for root in roots):
        return real
    shown = [str(r) for r in roots]
    raise HandlerError(f"{field_name}: {raw!r} resolves outside the allowed {what} {shown}"
                       + (f" (it resolves to '{real}')" if str(real) != raw else ""))


def check_image_spec(spec: ImageSpec, settings: Mapping[str, Any],
                     field_name: str = "payload.data.image") -> Path:
    """Validate the image path against the roots and the checksum syntax; return the real path."""
    real = resolve_within(spec.path, image_roots(settings), f"{field_name}.path", "image roots")
    if spec.checksum is not None:
        parse_checksum(spec.checksum, f"{field_name}.checksum")
    return real


def parse_checksum(value: str, field_name: str) -> tuple[str, str]:
    """Split 'sha256:<hex>' (or bare sha256 hex) into (algorithm, lower-case hex digest)."""
    algo, sep, digest = value.strip().partition(":")
    if not sep:
        algo, digest = "sha256", value.strip()
    algo = algo.lower()
    if algo not in _CHECKSUM_LENGTHS:
        raise HandlerError(f"{field_name}: unsupported checksum algorithm {algo!r}; "
                           f"use one of {sorted(_CHECKSUM_LENGTHS)}")
    digest = digest.lower()
    if len(digest) != _CHECKSUM_LENGTHS[algo] or any(c not in "0123456789abcdef" for c in digest):
        raise HandlerError(f"{field_name}: {value!r} is not a valid {algo} digest "
                           f"(expected {_CHECKSUM_LENGTHS[algo]} hex digits)")
    return algo, digest


def verify_checksum(path: Path, checksum: str, ctx: Context, span: tuple[int, int]) -> str:
    """Stream the image through the checksum, reporting progress within `span`; fail on mismatch."""
    algo, expected = parse_checksum(checksum, "payload.data.image.checksum")
    hasher = hashlib.new(algo)
    with _open_image_file(path, f"image '{path}'") as fh:
        total, done, last = max(os.fstat(fh.fileno()).st_size, 1), 0, 0.0
        while chunk := fh.read(4 * 1024 * 1024):
            hasher.update(chunk)
            done += len(chunk)
            if time.monotonic() - last >= 0.5:
                last = time.monotonic()
                pct = span[0] + (span[1] - span[0]) * done // total
                ctx.report_progress("checksum", pct, f"{algo}: {done} of {total} bytes")
    if hasher.hexdigest() != expected:
        raise HandlerError(f"image checksum verification failed for '{path}': expected {algo} "
                           f"{expected}, got {hasher.hexdigest()}; the image may be corrupt "
                           "or tampered with")
    ctx.report_progress("checksum", span[1], f"{algo} verified")
    return f"{algo}:{expected}"


def dissect_missing(operation: str) -> str | None:
    """Why `operation` cannot run here (the extra is not installed), or None when it can.

    Only looks the package up: importing it costs 5 MiB and 0.15 s in the supervisor.
    """
    try:
        found = importlib.util.find_spec("dissect.target") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"{operation} needs the optional extra: {EXTRA_HINT}"


def warm_up() -> None:
    """Import the inspection library and its plugin registry, so a forked job starts warm
    (and what its jobs import late: a job cannot read the interpreter's files to import)."""
    import pkgutil
    import sqlite3  # noqa: F401 - the rpmdb reader imports it late, as the supervisor never does

    from dissect.target import containers, filesystems, plugin, volumes

    logging.getLogger("dissect").setLevel(logging.ERROR)
    for codec in ("cp437", "utf-16-le"):  # FAT short and long file names
        codecs.lookup(codec)
    list(plugin.os_plugins())
    # Not the loaders package: some loaders define OS plugins that match any disk.
    for pkg in (containers, filesystems, volumes):
        for mod in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
            try:
                importlib.import_module(mod.name)
            except ImportError:  # a backend whose optional dependency is absent
                continue


class _AnonymousReader(io.BufferedReader):
    """A file reader without a `name`, so the image library cannot open files next to it."""

    @property
    def name(self) -> str:
        """Hide the file name (getattr(reader, "name", None) gives None)."""
        raise AttributeError("name")


@dataclass
class _ImageFile:
    """One file of the backing chain: its real path, header facts and open reader."""

    path: Path
    probe: ImageProbe
    fh: BinaryIO


def _open_image_file(path: Path, label: str) -> BinaryIO:
    """Open `path` read-only without following a symlink; refuse anything but a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise HandlerError(f"{label} does not exist") from None
    except OSError as exc:
        raise HandlerError(f"{label} cannot be opened: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise HandlerError(f"{label} is not a regular file")
    return _AnonymousReader(io.FileIO(fd, "rb", closefd=True), buffer_size=1024 * 1024)


def open_chain(path: Path, roots: list[Path]) -> list[_ImageFile]:
    """Open an image and its qcow2 backing files (top first), each checked against `roots`."""
    chain: list[_ImageFile] = []
    current: Path | None = path
    while current is not None:
        label = f"image '{current}'" if not chain else f"backing file '{current}' of '{path}'"
        if len(chain) > _MAX_BACKING_DEPTH or any(f.path == current for f in chain):
            raise HandlerError(f"image '{path}' has a backing chain that is too deep or circular")
        fh = _open_image_file(current, label)
        try:
            probe = probe_image(fh, label)
        except BaseException:
            fh.close()
            raise
        chain.append(_ImageFile(current, probe, fh))
        current = _backing_path(chain[-1], roots, path)
    return chain


def _backing_path(item: _ImageFile, roots: list[Path], top: Path) -> Path | None:
    """Where a qcow2 backing file resolves (relative to its image), required inside `roots`."""
    name = item.probe.backing_file
    if not name:
        return None
    raw = name if os.path.isabs(name) else os.path.join(item.path.parent, name)
    return resolve_within(raw, roots, f"backing file {name!r} of image '{top}'", "image roots")


def chain_paths(spec: ImageSpec, settings: Mapping[str, Any]) -> list[str]:
    """The image file and its qcow2 backing files inside the roots: what a job must read.

    Cheap and lenient (headers only); `open_chain` later gives the precise errors.
    """
    roots = image_roots(settings)
    try:
        current: Path | None = check_image_spec(spec, settings)
    except HandlerError:
        return []
    paths: list[str] = []
    while current is not None and len(paths) <= _MAX_BACKING_DEPTH and str(current) not in paths:
        paths.append(str(current))
        try:
            with _open_image_file(current, "image") as fh:
                name = qcow2_backing_name(fh)
            raw = None if name is None else os.path.join(current.parent, name)
            current = None if raw is None else resolve_within(raw, roots, "backing", "roots")
        except HandlerError:
            current = None
    return paths


@dataclass
class GuestImage:
    """An opened guest: the image chain and a read-only view of its disks and filesystems."""

    path: Path
    chain: list[_ImageFile]
    target: Any
    warnings: list[str] = field(default_factory=list)

    @property
    def probe(self) -> ImageProbe:
        """Header facts of the top image file."""
        return self.chain[0].probe

    @classmethod
    def open(cls, path: Path, roots: list[Path]) -> GuestImage:
        """Open the image at real path `path` read-only; HandlerError when it holds no OS."""
        chain = open_chain(path, roots)
        try:
            guest = cls(path, chain, _load_target(path, chain))
            guest._require_os()
        except BaseException:
            for item in chain:
                item.fh.close()
            raise
        return guest

    def close(self) -> None:
        """Release the image files."""
        for item in self.chain:
            item.fh.close()

    def __enter__(self) -> GuestImage:
        """The guest itself, closed on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the image files."""
        self.close()

    def _require_os(self) -> None:
        """Fail clearly for a file with no readable filesystem, or filesystems but no OS."""
        fs_names = [f"{v['filesystem']} on {v['name']!r}" for v in self.volumes() if v["filesystem"]]
        if not fs_names and not len(self.target.filesystems):
            raise HandlerError(f"image '{self.path}' is not a disk image this worker can read: no "
                               f"partition table or filesystem found (read as {self.probe.format})")
        if self.os_family() == "none":
            found = ", ".join(fs_names) or "none"
            raise HandlerError(f"No operating system found in image '{self.path}' "
                               f"(filesystems found: {found})")

    def os_family(self) -> str:
        """The OS family the library recognised: 'linux', 'windows', ... or 'none'."""
        name = str(self.target.os or "default")
        return "none" if name == "default" else name

    def volumes(self) -> list[dict[str, Any]]:
        """Partitions and logical volumes with their filesystem type, label and UUID."""
        return [_describe_volume(v) for v in self.target.volumes]

    def container(self) -> tuple[str, int]:
        """The container type the library read the top image as, and its virtual size."""
        disk = self.target.disks[0]
        return str(getattr(disk, "__type__", self.probe.format)), int(disk.size)

    def _path(self, guest_path: str) -> Any:
        """A path object inside the guest filesystem."""
        return self.target.fs.path(guest_path)

    def read_bytes(self, guest_path: str, limit: int = _READ_LIMIT) -> bytes | None:
        """Contents of a guest file (symlinks followed inside the guest), or None if unreadable."""
        try:
            with self._path(guest_path).open("rb") as fh:
                data = fh.read(limit + 1)
        except Exception as exc:  # a missing file or a corrupt structure in an untrusted image
            if not isinstance(exc, FileNotFoundError | NotADirectoryError) and \
                    not self._missing(guest_path):
                self.warnings.append(f"cannot read {guest_path}: {type(exc).__name__}: {exc}")
            return None
        if len(data) > limit:
            self.warnings.append(f"{guest_path} is larger than {limit} bytes; not read")
            return None
        return bytes(data)

    def read_text(self, guest_path: str) -> str | None:
        """A guest text file decoded as UTF-8 (bad bytes replaced), or None."""
        data = self.read_bytes(guest_path, 16 * 1024 * 1024)
        return None if data is None else data.decode("utf-8", "replace")

    def _missing(self, guest_path: str) -> bool:
        """Whether the guest path surely does not exist (a symlink loop, say, is not missing)."""
        try:
            return not self._path(guest_path).exists()
        except Exception:
            return False

    def exists(self, guest_path: str) -> bool:
        """Whether the guest path exists (symlinks followed)."""
        try:
            return bool(self._path(guest_path).exists())
        except Exception:
            return False

    def listdir(self, guest_path: str) -> list[str]:
        """Sorted names in a guest directory; empty when it is missing or unreadable."""
        try:
            return sorted(p.name for p in self._path(guest_path).iterdir())
        except Exception:
            return []

    def walk_posix(self, visit: Callable[[str, int], None], limit: int = 5_000_000) -> int:
        """Call visit(path, st_mode) for every entry of the POSIX filesystems; return the count."""
        mounts = dict(self.target.fs.mounts)
        count = 0
        for mnt, fs in sorted(mounts.items()):
            if mnt.startswith("/$fs$") or getattr(fs, "__type__", "") not in _POSIX_FS:
                continue
            # on btrfs every subvolume numbers its inodes from 256: they tell no directory apart
            by_inode = getattr(fs, "__type__", "") != "btrfs"
            for path, mode in _scan_tree(mnt.rstrip("/"), fs.get("/"), mounts, by_inode):
                visit(path, mode)
                count += 1
                if count >= limit:
                    self.warnings.append(f"file walk stopped after {limit} entries")
                    return count
        return count


def _scan_tree(base: str, root: Any, mounts: Mapping[str, Any],
               by_inode: bool) -> Iterator[tuple[str, int]]:
    """Yield (guest path, st_mode) below one filesystem, not crossing into other mounts. A
    crafted filesystem can link a directory into itself: each directory is entered once (by
    its inode, when `by_inode`), and at most _MAX_WALK_DEPTH levels down."""
    stack = [(base, root, 0)]
    entered: set[int] = set()
    with contextlib.suppress(Exception):
        entered.add(root.stat().st_ino)
    while stack:
        prefix, entry, depth = stack.pop()
        try:
            children = list(entry.scandir())
        except Exception:
            continue
        for child in children:
            path = f"{prefix}/{guest_name(child.name)}"
            try:
                st = child.stat(follow_symlinks=False)
            except Exception:
                continue
            yield path, st.st_mode
            if not stat.S_ISDIR(st.st_mode) or path in mounts or path.startswith(_SKIP_TREES) \
                    or depth >= _MAX_WALK_DEPTH:
                continue
            if by_inode and st.st_ino:
                if st.st_ino in entered:
                    continue
                entered.add(st.st_ino)
            try:
                stack.append((path, child.get(), depth + 1))
            except Exception:
                continue


def _load_target(path: Path, chain: list[_ImageFile]) -> Any:
    """Build the library's target from the opened chain (base first) and detect its OS."""
    from dissect.target import Target, container
    from dissect.target.containers.qcow2 import QCow2Container

    logging.getLogger("dissect").setLevel(logging.ERROR)
    label = f"image '{path}'"
    try:
        disk = container.open(chain[-1].fh)
        for item in reversed(chain[:-1]):
            disk = QCow2Container(item.fh, backing_file=disk)
        target = Target(path)
        target.disks.add(disk)
    except HandlerError:
        raise
    except Exception as exc:
        raise HandlerError(f"{label} cannot be read as a {chain[0].probe.format} disk image: "
                           f"{_cause(exc)}") from None
    try:
        target.apply()  # finds the volumes and filesystems, then reads the guest's own files
    except Exception as exc:
        raise HandlerError(f"{label}: its volumes or the guest's files could not be read "
                           f"(a corrupt or crafted filesystem?): {_cause(exc)}") from None
    return target


def _cause(exc: BaseException) -> str:
    """'Type: message' of what the image library raised (its own cause, when it chained one)."""
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {cause}"


def _describe_volume(vol: Any) -> dict[str, Any]:
    """One volume as the report shows it: where it is, its table type and its filesystem."""
    fstype, label, uuid = _fs_identity(vol.fs)
    vs_type = getattr(getattr(vol, "vs", None), "__type__", None)
    ptype = vol.type
    return {
        "name": vol.name,
        "number": vol.number,
        "kind": "logical_volume" if vs_type == "lvm" else "partition" if vs_type else "disk",
        "table": "gpt" if hasattr(ptype, "hex") else "mbr" if isinstance(ptype, int) else None,
        "type": str(ptype) if hasattr(ptype, "hex") else
                f"0x{ptype:02x}" if isinstance(ptype, int) else None,
        "offset": vol.offset,
        "size": vol.size,
        "filesystem": fstype,
        "label": label,
        "uuid": uuid,
    }


def _fs_identity(fs: Any) -> tuple[str | None, str | None, str | None]:
    """(type, label, uuid) of a filesystem as the library opened it; Nones when unknown."""
    if fs is None:
        return None, None, None
    kind = str(getattr(fs, "__type__", "unknown"))
    try:
        if kind == "ext":
            sb = fs.extfs.sb
            name = ("ext4" if sb.s_feature_incompat & 0x2C0 else
                    "ext3" if sb.s_feature_compat & 0x4 else "ext2")
            return name, fs.extfs.volume_name or None, str(fs.extfs.uuid)
        if kind == "xfs":
            label = bytes(fs.xfs.sb.sb_fname).rstrip(b"\0").decode("utf-8", "replace")
            return "xfs", label or None, str(fs.xfs.uuid)
        if kind == "fat":
            vid = str(fs.fatfs.volume_id).upper()
            uuid = f"{vid[:4]}-{vid[4:]}" if len(vid) == 8 else vid
            return "vfat", (fs.fatfs.volume_label or "").strip() or None, uuid
    except Exception:
        return kind, None, None
    return kind, None, None


def open_guest(ctx: Context, image: ImageSpec, settings: Any,
               span: tuple[int, int]) -> tuple[GuestImage, dict[str, Any]]:
    """Re-check the image path, verify its checksum, open it; return it and its image section."""
    real = check_image_spec(image, settings)
    checksum = verify_checksum(real, image.checksum, ctx, span) if image.checksum else None
    ctx.report_progress("inspection", span[1] + 5, f"opening {real.name}")
    guest = GuestImage.open(real, image_roots(settings))
    return guest, image_section(guest, image, checksum)


def image_section(guest: GuestImage, image: ImageSpec, checksum: str | None) -> dict[str, Any]:
    """The report's `image`: path, declared and detected format, sizes, backing chain."""
    container, virtual = guest.container()
    probe = guest.probe
    if image.format and image.format != probe.format:
        guest.warnings.append(f"payload.data.image.format is {image.format!r} but the file is "
                              f"{probe.format}; it was read as {probe.format}")
    if image.size_bytes is not None and image.size_bytes != probe.file_size:
        guest.warnings.append(f"payload.data.image.size_bytes is {image.size_bytes} but the "
                              f"file has {probe.file_size} bytes")
    return {"path": str(guest.path), "requested_path": image.path, "format": probe.format,
            "declared_format": image.format, "container": container, "virtual_size": virtual,
            "file_size": probe.file_size, "compressed": probe.compressed,
            "backing_chain": [str(f.path) for f in guest.chain[1:]], "checksum": checksum,
            "opened_read_only": True}


def guest_facts(guest: GuestImage) -> GuestFacts:
    """Facts over the guest, with the library's hostname and architecture as hints."""
    hints = []
    for attr in ("hostname", "architecture"):
        try:
            hints.append(getattr(guest.target, attr))
        except Exception:
            hints.append(None)
    return GuestFacts(guest, hostname_hint=hints[0], arch_hint=hints[1])
