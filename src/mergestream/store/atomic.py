"""Publish a directory atomically: readers of OUT see the old complete one or the new one.

An export is built in a fresh directory beside OUT (same file system), every file and directory
in it fsync'd, and then switched in with one `renameat2(RENAME_EXCHANGE)`: the kernel swaps the
two names in one step, so there is no instant at which OUT is missing or mixes files of two
exports. The old directory, now under the temporary name, is removed afterwards. Where the file
system cannot exchange names, OUT is first renamed aside and the new directory renamed to OUT:
a reader may then briefly find no OUT, but never a mixture.

OUT's own files that the new export does not write are kept: they are hard-linked into the new
directory before the switch (nothing is copied, and a user's notes or evaluation results in OUT
survive every export). A process killed at any moment leaves at most a hidden
`.OUT.mergestream-PID-...` directory beside OUT, which the next publish of OUT removes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2():  # noqa: ANN202 - a ctypes function or None
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` atomically; False where the system cannot."""
    if _RENAMEAT2 is None:
        return False
    result = _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def temporary_sibling(out: Path) -> Path:
    """A new name beside `out` for a directory being built (see `remove_stale_siblings`)."""
    return out.with_name(f".{out.name}.mergestream-{os.getpid()}-{secrets.token_hex(4)}")


def remove_stale_siblings(out: Path) -> None:
    """Remove directories left beside `out` by publishes whose process is gone."""
    prefix = f".{out.name}.mergestream-"
    with contextlib.suppress(OSError):
        for item in out.parent.iterdir():
            if not item.name.startswith(prefix):
                continue
            pid_text = item.name[len(prefix) :].split("-", 1)[0]
            if pid_text.isdigit() and _alive(int(pid_text)):
                continue
            shutil.rmtree(item, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a file's data, or a directory's entries (created, renamed, removed files), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, directories after their contents."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                fsync_dir(path)
        fsync_dir(directory)


def link_kept_files(old: Path, new: Path, keep: Iterable[str]) -> None:
    """Hard-link the files `keep` (relative paths) of directory `old` into `new`, unless `new`
    already has them; a file system without hard links gets copies."""
    for relative in keep:
        source, target = old / relative, new / relative
        if target.exists() or target.is_symlink():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), target)
            continue
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)


def files_under(root: Path) -> list[str]:
    """Relative paths of every file (and symlink) under `root`, sorted; [] if it is absent."""
    if not root.is_dir():
        return []
    found = []
    for directory, dirs, files in os.walk(root):
        base = Path(directory).relative_to(root)
        for name in files:
            found.append(str(base / name) if str(base) != "." else name)
        for name in dirs:
            if os.path.islink(os.path.join(directory, name)):
                found.append(str(base / name) if str(base) != "." else name)
    return sorted(found)


def publish_directory(out: Path, build: Callable[[Path], T], keep: Iterable[str] = ()) -> T:
    """Build a new version of directory `out` with `build(directory)` and switch it in
    atomically (module docstring); `keep` lists files of the current `out` to carry over.
    Returns what `build` returned. On any failure `out` is untouched and nothing is left."""
    out = Path(os.path.abspath(out))
    if out.is_symlink():
        out = out.resolve()  # replace the directory the link points to; the link stays
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    staging = temporary_sibling(out)
    staging.mkdir()
    try:
        result = build(staging)
        if out.is_dir():
            link_kept_files(out, staging, keep)
        fsync_tree(staging)
        _switch(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # `staging` now names the previous version (or nothing, for a first publish).
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        fsync_dir(out.parent)
    return result


def _switch(staging: Path, out: Path) -> None:
    """Make `staging` the directory named `out`; afterwards `staging` names the old one."""
    if not out.exists():
        os.rename(staging, out)  # refuses if `out` appeared meanwhile as a non-empty dir
        return
    if exchange(staging, out):
        return
    aside = temporary_sibling(out)
    os.rename(out, aside)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(aside, out)
        raise
    os.rename(aside, staging)
