"""Reading the kernel's rendered files (cgroup counters, cgroup.procs): whole, though the
kernel hands them out a page at a time, with short reads before their end."""

from __future__ import annotations

import os

from worker import cgroups


def test_a_rendered_file_longer_than_a_page_is_read_whole() -> None:
    # kallsyms is rendered like cgroup.procs: a read returns the lines that fit one page
    fd = os.open("/proc/kallsyms", os.O_RDONLY)
    try:
        first = os.pread(fd, 65536, 0)
    finally:
        os.close(fd)
    assert len(first) < 65536  # a short read, far from the end
    with open("/proc/kallsyms", "rb") as f:
        whole = f.read()
    text = cgroups._read("/proc/kallsyms")
    assert len(text) > len(first)
    assert text.count("\n") == whole.count(b"\n")
