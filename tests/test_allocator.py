"""The allocator setting the command line makes: freed tensor-sized memory leaves the process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from mergestream import allocator, cli

# In a fresh process: allocate, touch and free 16 MiB twice with the C library's malloc, and
# print how much resident memory that left behind. glibc serves the first block by its own
# mapping and then raises its threshold to 16 MiB, so by default the second block comes from the
# heap and stays resident after free.
PROBE = """
import ctypes, ctypes.util, sys
from mergestream.allocator import return_freed_memory_to_os
if sys.argv[1] == "set":
    assert return_freed_memory_to_os()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
before = resident()
for _ in range(2):
    block = libc.malloc(16 << 20)
    ctypes.memset(block, 1, 16 << 20)
    libc.free(block)
print(resident() - before)
"""


def _left_behind(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != allocator.ENVIRONMENT_VARIABLE}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True
    )
    return int(done.stdout.strip())


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_freed_blocks_leave_the_process_once_set() -> None:
    if _left_behind("default") < 8 << 20:
        pytest.skip("this C library already returns such blocks by default")
    assert _left_behind("set") < 4 << 20


def test_a_threshold_in_the_environment_is_left_alone(monkeypatch) -> None:
    monkeypatch.setenv(allocator.ENVIRONMENT_VARIABLE, "65536")
    assert allocator.return_freed_memory_to_os() is False
    with pytest.raises(ValueError, match="positive"):
        allocator.return_freed_memory_to_os(0)


def test_the_command_line_sets_it_first(monkeypatch, capsys) -> None:
    calls = []
    monkeypatch.setattr(cli, "return_freed_memory_to_os", lambda: calls.append(1) or True)
    assert cli.main(["methods"]) == 0
    assert calls == [1]
    capsys.readouterr()
