"""CRC-32 of a stretch of a file, read in chunks: what the state's part files are checked
against. No torch here, so `mergestream status --verify` checks a state without loading it."""

from __future__ import annotations

import os
import zlib

CRC_CHUNK = 8 << 20


def file_crc32(fd: int, offset: int, size: int) -> int:
    """CRC-32 of `size` bytes of an open file from `offset` on, read in chunks."""
    crc = 0
    buffer = bytearray(min(size, CRC_CHUNK))
    view = memoryview(buffer)
    done = 0
    while done < size:
        n = os.preadv(fd, [view[: min(len(view), size - done)]], offset + done)
        if n == 0:
            raise EOFError
        crc = zlib.crc32(view[:n], crc)
        done += n
    return crc
