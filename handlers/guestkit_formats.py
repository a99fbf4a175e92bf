"""Disk-image container formats read from their headers: type, virtual size, referenced files.

Stdlib only, so the supervisor and qemu-img callers can use it without the inspection
extra. The qcow2 reader also checks that every table and cluster lies inside the file,
which is how a truncated image is told apart from an image that holds no OS.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

from worker.errors import HandlerError

__all__ = [
    "FORMAT_ALIASES", "ImageProbe", "normalize_format", "probe_image", "qcow2_backing_name",
]

#: Accepted `format` spellings and the container format each one names.
FORMAT_ALIASES: dict[str, str] = {
    "qcow2": "qcow2", "vmdk": "vmdk", "vdi": "vdi", "vhdx": "vhdx", "vhd": "vhd",
    "vpc": "vhd", "raw": "raw", "img": "raw", "ova": "ova",
}

_QCOW2_MAGIC = b"QFI\xfb"
_QCOW2_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
_QCOW2_MAX_L1_ENTRIES = 32 * 1024 * 1024 // 8
_QCOW2_EXT_DATA_FILE = 0x44415441
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2
_QCOW2_INCOMPAT_EXTL2 = 1 << 4
_VMDK_SPARSE_MAGIC = b"KDMV"
_VMDK_DESCRIPTOR_MAGIC = b"# Disk DescriptorFile"
_VHD_COOKIE = b"conectix"
_VHD_DIFFERENCING = 4
_VDI_SIGNATURE = 0xBEDA107F
_DESCRIPTOR_LIMIT = 1024 * 1024


@dataclass
class ImageProbe:
    """What the header of one image file says about it."""

    format: str
    file_size: int
    virtual_size: int | None = None
    backing_file: str | None = None
    compressed: bool | None = None
    notes: list[str] = field(default_factory=list)


def normalize_format(name: str) -> str:
    """Map a declared format ('img', 'vpc', 'QCOW2') to its container format name."""
    fmt = FORMAT_ALIASES.get(name.strip().lower())
    if fmt is None:
        raise ValueError(f"unsupported image format {name!r}; use one of {sorted(FORMAT_ALIASES)}")
    return fmt


def qcow2_backing_name(fh: BinaryIO) -> str | None:
    """The backing file name a qcow2 header names, None for no backing file or not qcow2."""
    hdr = _pread(fh, 0, 20)
    if len(hdr) < 20 or not hdr.startswith(_QCOW2_MAGIC):
        return None
    offset, length = struct.unpack_from(">QI", hdr, 8)
    if not offset or not 0 < length <= 4096:
        return None
    return _pread(fh, offset, length).decode("utf-8", "replace")


def probe_image(fh: BinaryIO, label: str) -> ImageProbe:
    """Identify the image open in `fh`; raise HandlerError naming `label` when it is unusable."""
    size = os.fstat(fh.fileno()).st_size
    head = _pread(fh, 0, 512)
    if head.startswith(_QCOW2_MAGIC):
        return _probe_qcow2(fh, size, label)
    if head.startswith(_VMDK_SPARSE_MAGIC) or head.startswith(_VMDK_DESCRIPTOR_MAGIC):
        return _probe_vmdk(fh, head, size, label)
    if head.startswith(b"vhdxfile"):
        return ImageProbe("vhdx", size)
    if len(head) >= 0x48 and struct.unpack_from("<I", head, 0x40)[0] == _VDI_SIGNATURE:
        return ImageProbe("vdi", size, virtual_size=struct.unpack_from("<Q", head, 0x170)[0]
                          if len(head) >= 0x178 else None)
    if (size >= 512 and _pread(fh, size - 512, 8) == _VHD_COOKIE) or head.startswith(_VHD_COOKIE):
        return _probe_vhd(fh, head, size, label)
    if len(head) >= 262 and head[257:262] == b"ustar":
        raise HandlerError(f"{label} is a tar (OVA) archive, not a disk image: extract its disks")
    return ImageProbe("raw", size, virtual_size=size)


def _pread(fh: BinaryIO, offset: int, length: int) -> bytes:
    """Read up to `length` bytes at `offset` without moving other readers."""
    return os.pread(fh.fileno(), length, offset)


def _probe_qcow2(fh: BinaryIO, size: int, label: str) -> ImageProbe:
    """Parse a qcow2 header, its backing file name, and check its tables against the file size."""
    hdr = _pread(fh, 0, 112)
    if len(hdr) < 72:
        raise HandlerError(f"{label} is a truncated qcow2 image: the header is incomplete")
    version, b_off, b_len, cluster_bits, vsize = struct.unpack_from(">IQIIQ", hdr, 4)
    l1_size, l1_off = struct.unpack_from(">IQ", hdr, 36)
    incompat = struct.unpack_from(">Q", hdr, 72)[0] if version >= 3 and len(hdr) >= 80 else 0
    if version not in (2, 3) or not 9 <= cluster_bits <= 21:
        raise HandlerError(f"{label} has a corrupt qcow2 header (version {version}, "
                           f"cluster_bits {cluster_bits})")
    if incompat & _QCOW2_INCOMPAT_DATA_FILE:
        raise HandlerError(f"{label} keeps its data in an external data file, which is not supported")
    probe = ImageProbe("qcow2", size, virtual_size=vsize)
    if b_off:
        name = _pread(fh, b_off, min(b_len, 4096))
        if b_len > 4096 or len(name) != b_len:
            raise HandlerError(f"{label} has a corrupt qcow2 backing file name")
        probe.backing_file = name.decode("utf-8", "replace")
    probe.compressed = _check_qcow2_tables(fh, size, cluster_bits, l1_size, l1_off,
                                           bool(incompat & _QCOW2_INCOMPAT_EXTL2), label)
    return probe


def _check_qcow2_tables(fh: BinaryIO, size: int, cluster_bits: int, l1_size: int, l1_off: int,
                        extended_l2: bool, label: str) -> bool:
    """Fail when an L1/L2 table or data cluster lies past the end of the file; True if compressed."""
    cluster = 1 << cluster_bits
    if l1_size > _QCOW2_MAX_L1_ENTRIES or l1_off + 8 * l1_size > size:
        raise _truncated(label, "its L1 table", l1_off, size)
    entry_size = 16 if extended_l2 else 8
    compressed_bit, csize_shift = 1 << 62, 62 - (cluster_bits - 8)
    any_compressed = False
    for l1 in struct.unpack(f">{l1_size}Q", _pread(fh, l1_off, 8 * l1_size)):
        l2_off = l1 & _QCOW2_OFFSET_MASK
        if not l2_off:
            continue
        if l2_off + cluster > size:
            raise _truncated(label, "an L2 table", l2_off, size)
        table = struct.unpack(f">{cluster // 8}Q", _pread(fh, l2_off, cluster))[:: entry_size // 8]
        for entry in table:
            if entry & compressed_bit:
                any_compressed = True
                host = entry & ((1 << csize_shift) - 1)
            else:
                host = entry & _QCOW2_OFFSET_MASK
            if host >= size:
                raise _truncated(label, "a data cluster", host, size)
    return any_compressed


def _truncated(label: str, what: str, offset: int, size: int) -> HandlerError:
    """The error for a qcow2 structure that points past the end of the file."""
    return HandlerError(f"{label} is a truncated or corrupt qcow2 image: {what} at offset "
                        f"{offset} lies beyond the end of the file ({size} bytes)")


def _probe_vmdk(fh: BinaryIO, head: bytes, size: int, label: str) -> ImageProbe:
    """Accept a self-contained vmdk only: no parent disk and no extents in other files."""
    if head.startswith(_VMDK_SPARSE_MAGIC):
        capacity, _grain, desc_off, desc_len = struct.unpack_from("<QQQQ", head, 12)
        text = _pread(fh, desc_off * 512, min(desc_len * 512, _DESCRIPTOR_LIMIT)) if desc_off else b""
        own_extent = True
    else:
        text, capacity, own_extent = _pread(fh, 0, _DESCRIPTOR_LIMIT), 0, False
    desc = text.split(b"\0", 1)[0].decode("utf-8", "replace")
    parent, extents = _vmdk_descriptor(desc)
    if parent:
        raise HandlerError(f"{label} is a vmdk delta disk (parentCID {parent}); "
                           "only self-contained vmdk images are supported")
    if not own_extent:
        raise HandlerError(f"{label} is a vmdk descriptor that keeps its data in other files "
                           f"({', '.join(extents) or 'no extents'}); use a monolithic vmdk")
    return ImageProbe("vmdk", size, virtual_size=capacity * 512)


def _vmdk_descriptor(text: str) -> tuple[str | None, list[str]]:
    """Return (parent CID unless none, extent file names) from a vmdk descriptor."""
    parent, extents = None, []
    for line in text.splitlines():
        line = line.strip()
        if line.lower().startswith("parentcid="):
            value = line.split("=", 1)[1].strip().strip('"').lower()
            parent = None if value == "ffffffff" else value
        elif line[:3] in ("RW ", "RDO", "NOA") and '"' in line:
            extents.append(line.split('"')[1])
    return parent, extents


def _probe_vhd(fh: BinaryIO, head: bytes, size: int, label: str) -> ImageProbe:
    """Read a VHD footer; refuse differencing disks (they name a parent file)."""
    footer = _pread(fh, size - 512, 512) if size >= 512 else b""
    if not footer.startswith(_VHD_COOKIE):
        footer = head
    current_size, = struct.unpack_from(">Q", footer, 48)
    disk_type, = struct.unpack_from(">I", footer, 60)
    if disk_type == _VHD_DIFFERENCING:
        raise HandlerError(f"{label} is a differencing VHD; only self-contained VHD images "
                           "are supported")
    return ImageProbe("vhd", size, virtual_size=current_size)
