"""`keep_freed_memory` (rl/allocator.py): on glibc, memory a step frees is reused by the
next step instead of being returned to the OS and page-faulted back."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

# each case runs in a fresh interpreter: the setting is process-wide and cannot be undone
SCRIPT = textwrap.dedent("""
    import os, resource, sys
    import torch
    from vocalign.rl.allocator import keep_freed_memory

    if sys.argv[1] == "on":
        applied = keep_freed_memory()
    else:  # glibc's documented default without its run-time adjustment: every block of 128 KiB or more is its own mmap
        import ctypes
        applied = bool(ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)) and False
    def step():  # a forward's worth of activations, 1 to 16 MiB each, touched, then all freed
        blocks = [torch.ones((k % 16 + 1) << 18) for k in range(40)]
        del blocks
    step(); step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    pages = 5 * sum((k % 16 + 1) << 18 for k in range(40)) * 4 // 4096
    print(applied, faults / pages)  # page faults per page touched
""")


def run(mode: str, env: dict | None = None) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, env=env)
    applied, ratio = out.stdout.split()
    return applied == "True", float(ratio)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's; other C libraries are left alone")
def test_freed_memory_is_reused_without_page_faults():
    applied, with_setting = run("on")
    assert applied
    assert with_setting < 0.05  # the blocks come back from the heap, already mapped
    # (glibc's own default adapts its thresholds at run time and lands anywhere between the two)
    _, without = run("mmap-per-block")
    assert without > 0.9  # mmap'ed and unmapped per block: every page faults again


def test_it_can_be_switched_off():
    env = {**os.environ, "VOCALIGN_KEEP_FREED_MEMORY": "0"}
    applied, _ = run("on", env)
    assert not applied
