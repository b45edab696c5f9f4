"""Which checkpoints in an inbox folder are completely written, from their own structure.

Trainers write checkpoints file by file and piece by piece; reading one early gives a corrupt
merge. A checkpoint counts as complete only when every file it needs exists with the size its own
headers declare:
- a safetensors file: the 8-byte header length, the JSON header, and data up to the last tensor's
  end offset;
- a PyTorch `.bin`/`.pt`/`.pth` zip (what `torch.save` writes): the end-of-central-directory record
  that closes the archive, describing a central directory that lies inside the file;
- sharded checkpoints: the index, and every shard it lists, each complete. Shards named
  `model-0000K-of-0000N.safetensors` without their index are incomplete (the index is usually
  written last).
On top of that, nothing in the checkpoint may change for `settle` seconds (see `Settler`).

Each top-level entry of the inbox is one checkpoint: a weight file, or a folder (an HF model
directory or an adapter directory). Hidden entries and names of files still being written under a
temporary name (`.tmp`, `.partial`, `.part`, `.incomplete`, `.lock`, `~`) are ignored.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
WEIGHT_SUFFIXES = (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES)
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")
TEMPORARY_SUFFIXES = (".tmp", ".partial", ".part", ".incomplete", ".lock", "~")
SHARD_NAME = re.compile(r".*-\d{5}-of-(\d{5})\.(safetensors|bin)")
ZIP_LOCAL_MAGIC = b"PK\x03\x04"
MAX_HEADER_BYTES = 100 << 20

Fingerprint = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class Inspection:
    """What one inbox entry looks like right now."""

    name: str  # the entry's name inside the inbox
    path: Path
    missing: str  # why the checkpoint is not complete yet; "" when it is
    fingerprint: Fingerprint = field(default=())  # (relative path, size, mtime_ns) of its files
    newest_mtime: float = 0.0  # seconds since the epoch, of its most recently changed file

    @property
    def complete(self) -> bool:
        return not self.missing


def is_ignored(name: str) -> bool:
    return name.startswith(".") or name.endswith(TEMPORARY_SUFFIXES)


def list_entries(inbox: Path) -> list[Path]:
    """The inbox's top-level entries that may be checkpoints, by name."""
    entries = []
    for item in sorted(inbox.iterdir()):
        if is_ignored(item.name):
            continue
        if item.is_dir() or (item.is_file() and item.suffix in WEIGHT_SUFFIXES):
            entries.append(item)
    return entries


def inspect_inbox(inbox: Path) -> list[Inspection]:
    return [inspect_entry(path) for path in list_entries(inbox)]


def inspect_entry(path: Path) -> Inspection:
    """Whether the checkpoint at `path` is completely written, with its current fingerprint.
    Never raises for a file that vanishes or changes while it is looked at: that is `missing`."""
    try:
        fingerprint, newest = _fingerprint(path)
        missing = _missing_in_dir(path) if path.is_dir() else _missing_in_file(path, top=True)
    except OSError as err:
        return Inspection(path.name, path, f"cannot be read yet ({err.strerror or err})")
    return Inspection(path.name, path, missing, fingerprint, newest)


def _fingerprint(path: Path) -> tuple[Fingerprint, float]:
    if path.is_file():
        st = path.stat()
        return ((path.name, st.st_size, st.st_mtime_ns),), st.st_mtime
    rows, newest = [], 0.0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            item = Path(root) / name
            st = item.stat()
            rows.append((str(item.relative_to(path)), st.st_size, st.st_mtime_ns))
            newest = max(newest, st.st_mtime)
    return tuple(rows), newest


def _missing_in_file(path: Path, *, top: bool = False) -> str:
    match = SHARD_NAME.fullmatch(path.name)
    if top and match:
        return (
            f"{path.name} is one shard of {int(match.group(1))}; a sharded checkpoint is "
            "complete only in a folder with its index"
        )
    if path.suffix == SAFETENSORS_SUFFIX:
        return safetensors_missing(path)
    if path.suffix in TORCH_SUFFIXES:
        return torch_zip_missing(path)
    return f"{path.name}: not a weight file"


def _missing_in_dir(path: Path) -> str:
    for index_name in INDEX_NAMES:
        index = path / index_name
        if index.is_file():
            return _missing_in_index(index)
    for name in SINGLE_NAMES:
        if (path / name).is_file():
            return _missing_in_file(path / name)
    weights = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not is_ignored(p.name)
    )
    shards = [p.name for p in weights if SHARD_NAME.fullmatch(p.name)]
    if shards:
        total = int(SHARD_NAME.fullmatch(shards[0]).group(1))  # type: ignore[union-attr]
        return f"{len(shards)} of {total} shards and no index ({' or '.join(INDEX_NAMES)}) yet"
    if not weights:
        return "no weight files yet"
    if len(weights) > 1:
        return f"{len(weights)} weight files and no index saying how they belong together"
    return _missing_in_file(weights[0])


def _missing_in_index(index: Path) -> str:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{index.name} is not a complete index yet"
    if not shards or not all(isinstance(s, str) for s in shards):
        return f"{index.name} lists no shards"
    for shard in shards:
        shard_path = index.parent / shard
        if not shard_path.is_file():
            return f"shard {shard} listed by {index.name} is missing"
        missing = _missing_in_file(shard_path)
        if missing:
            return missing
    return ""


def safetensors_missing(path: Path) -> str:
    """Why the safetensors file lacks bytes its header declares, or "" when it has them all. A file
    whose header is complete but is not valid safetensors counts as complete: reading it gives
    the real error."""
    size = path.stat().st_size
    if size < 8:
        return f"{path.name}: {size} bytes, less than a safetensors header"
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES:
            return ""  # not safetensors at all: let the reader refuse it with the reason
        if 8 + header_len > size:
            return f"{path.name}: {size} bytes, its header alone declares {8 + header_len}"
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        ends = [
            int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"
        ]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return ""  # corrupt header of the full declared length: refused when read
    declared = 8 + header_len + max(ends, default=0)
    if size < declared:
        return f"{path.name}: {size} of the {declared} bytes its header declares"
    return ""


def torch_zip_missing(path: Path) -> str:
    """Why the zip archive `torch.save` writes is not closed yet (its central directory is
    written last), or "" when it is. A file that is not a zip at all counts as complete: reading
    it gives the real error (e.g. the legacy pickle format)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if size < 4:
        return f"{path.name}: {size} bytes, not yet a zip archive"
    if magic != ZIP_LOCAL_MAGIC:
        return ""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return f"{path.name}: the zip archive is not closed yet (no central directory)"
    if not infos:
        return f"{path.name}: an empty zip archive"
    end = max(i.header_offset + 30 + len(i.filename) + i.compress_size for i in infos)
    if end > size:
        return f"{path.name}: {size} bytes, its archive directory declares at least {end}"
    return ""


class Settler:
    """Decides when a complete checkpoint has been still long enough to be read.

    A checkpoint is settled once its fingerprint (every file's size and mtime) has been seen
    unchanged for `settle` seconds by this process, or once its newest file is older than `settle`
    seconds by the clock (so a restart does not wait again for checkpoints long finished).
    """

    def __init__(self, settle: float):
        self.settle = settle
        self._first_seen: dict[str, tuple[Fingerprint, float]] = {}

    def settled(self, inspections: Iterable[Inspection], now: float, wall: float) -> list[str]:
        """Names of the complete checkpoints that are settled at monotonic time `now`."""
        ready = []
        seen = set()
        for item in inspections:
            seen.add(item.name)
            if not item.complete:
                self._first_seen.pop(item.name, None)
                continue
            known = self._first_seen.get(item.name)
            if known is None or known[0] != item.fingerprint:
                self._first_seen[item.name] = known = (item.fingerprint, now)
            if now - known[1] >= self.settle or wall - item.newest_mtime >= self.settle:
                ready.append(item.name)
        for name in set(self._first_seen) - seen:
            del self._first_seen[name]
        return ready

    def next_check(self, now: float) -> float | None:
        """Seconds until the earliest complete but unsettled checkpoint may settle."""
        waits = [max(0.0, t + self.settle - now) for _, t in self._first_seen.values()]
        waits = [w for w in waits if w > 0]
        return min(waits) if waits else None
