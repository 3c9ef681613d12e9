"""The allocator tuning every p2pacs process applies: blob-sized buffers stay in the heap."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import ctypes
from p2pacs.allocator import tune_allocator


def in_heap(buf: bytearray) -> bool:
    addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    for line in open("/proc/self/maps"):
        span, *rest = line.split()
        if rest[-1] == "[heap]":
            low, high = (int(x, 16) for x in span.split("-"))
            return low <= addr < high
    return False


before = in_heap(bytearray(12 << 20))
tuned = tune_allocator()
after = in_heap(bytearray(12 << 20))
print(before, tuned, after)
"""


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the tuning applies to glibc's malloc only"
)
def test_blob_sized_buffers_come_from_the_heap_once_tuned() -> None:
    # a fresh process: glibc's own threshold moves as a process frees mapped buffers
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["False", "True", "True"]
