"""Content hashes for the ledger and the base fingerprint.

Files are hashed in fixed-size chunks read into one reused buffer, so hashing a checkpoint of any
size costs a few megabytes of memory.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, StateError
from ..io.source import TensorSource
from ..progress import NoProgress, Progress

CHUNK = 8 << 20


def sha256_files(
    files: list[Path],
    progress: Progress | None = None,
    items_per_file: list[int] | None = None,
) -> str:
    """SHA-256 of the files' bytes, concatenated in order. `items_per_file` is what each file
    counts for in the progress display (tensors); bytes advance as they are read."""
    progress = progress or NoProgress()
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    for index, path in enumerate(files):
        try:
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buffer):
                    digest.update(view[:n])
                    progress.advance(0, n)
        except OSError as err:
            raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None
        progress.advance(items_per_file[index] if items_per_file else 1, 0)
    return digest.hexdigest()


def sha256_tensors(source: TensorSource, progress: Progress | None = None) -> str:
    """Hash of names, dtypes, shapes and bytes, for sources that are not files."""
    progress = progress or NoProgress()
    digest = hashlib.sha256()
    for name in source.names():
        tensor = source.get(name).detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        progress.advance(1, tensor.numel() * tensor.element_size())
    return digest.hexdigest()


def content_hash(source: TensorSource, progress: Progress | None = None) -> str:
    """SHA-256 of a checkpoint: of its files' bytes, or of its tensors for in-memory sources."""
    progress = progress or NoProgress()
    files = source.files()
    if files:
        total = sum(os.path.getsize(p) for p in files)
        counts = _tensors_per_file(source, files)
        progress.start("hashing", sum(counts), total)
        try:
            return sha256_files(files, progress, counts)
        finally:
            progress.finish()
    names = source.names()
    progress.start("hashing", len(names), sum(source.spec(n).nbytes for n in names))
    try:
        return sha256_tensors(source, progress)
    finally:
        progress.finish()


def _tensors_per_file(source: TensorSource, files: list[Path]) -> list[int]:
    file_of = getattr(source, "file_of", None)
    if file_of is None or len(files) == 1:
        return [len(source.names())] + [0] * (len(files) - 1)
    index = {str(p): i for i, p in enumerate(files)}
    counts = [0] * len(files)
    for name in source.names():
        i = index.get(str(file_of(name)))
        if i is not None:
            counts[i] += 1
    return counts


def file_stamps(files: list[Path]) -> list[dict[str, object]]:
    """Cheap identity of files (name, size, mtime) to notice when a base changed on disk."""
    stamps = []
    for path in files:
        st = path.stat()
        stamps.append({"file": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return stamps


def header_fingerprint(files: list[Path]) -> str | None:
    """SHA-256 of what describes the files' contents without reading their data: a safetensors
    file's header, a zip-format PyTorch file's central directory (names, sizes and the CRC-32
    of every record, so it changes with the data too). Cheap enough for every `add`, and it
    notices a base rewritten in place with the same size and modification time. None for
    sources without files."""
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        try:
            digest.update(_describing_bytes(path))
        except OSError as err:
            raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None
    return digest.hexdigest()


def _describing_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        prefix = f.read(8)
        if zipfile.is_zipfile(f):
            f.seek(0)
            try:
                with zipfile.ZipFile(f) as archive:
                    return repr(
                        [
                            (i.filename, i.CRC, i.file_size, i.header_offset)
                            for i in archive.infolist()
                        ]
                    ).encode()
            except (zipfile.BadZipFile, ValueError):
                pass
        size = os.fstat(f.fileno()).st_size
        if len(prefix) == 8:
            header_len = struct.unpack("<Q", prefix)[0]
            if 8 + header_len <= size and header_len <= 100 << 20:
                f.seek(8)
                return prefix + f.read(header_len)
        return str(size).encode()


def check_base_unchanged(
    recorded: Mapping[str, Any], base: TensorSource, verify: bool = False
) -> list[dict[str, object]] | None:
    """Refuse to go on if the base's content changed since the state was created (`recorded`
    is the manifest's "base").

    Every call compares the base files' headers (safetensors headers, zip directories) with
    the fingerprint recorded at init; when they, or the files' sizes and modification times,
    differ, or `verify` asks for it, the full content hash decides. Returns the base files'
    current stamps when they differ from the recorded ones but the content is the same (e.g.
    the files were copied), so the next commit can record them."""
    files = base.files()
    if not files:
        return None
    try:
        stamps = file_stamps(files)
        headers = header_fingerprint(files)
    except (OSError, CheckpointError) as err:
        raise StateError(
            f"the base at {recorded['path']} cannot be read any more ({err})"
        ) from None
    recorded_headers = recorded.get("headers_sha256")
    same_headers = recorded_headers is None or headers == recorded_headers
    if recorded["sha256"] is None or (stamps == recorded["files"] and same_headers and not verify):
        return None
    if content_hash(base) != recorded["sha256"]:
        raise StateError(
            f"the base at {recorded['path']} has changed since this state was created "
            f"(its content hash is no longer the recorded {recorded['sha256'][:16]}...); "
            "merging into or exporting from a different base would be wrong. Restore the "
            "original base files, or start a new state for the new base"
        )
    return None if stamps == recorded["files"] else stamps
