"""Publishing exports so that a reader of OUT sees one whole model, never a mixture.

OUT is a symbolic link. Each export is written into a folder beside it, `OUT.versions/`, first
under a hidden temporary name, renamed to `step-000007-<id>` once complete, and then OUT is
switched to it by renaming a new link over the old one (one atomic `rename`). A reader that opens
OUT/model.safetensors gets the previous complete model or the new one. For sharded exports, a
reader should resolve OUT once (`os.path.realpath`) and read every shard through that path. The
last `keep` versions are kept (and always the one OUT points to), so a reader that resolved OUT a
moment ago still finds its files.

`<id>` is the start of the content hash of the step's checkpoint: a version folder names exactly
one merged model, so one left by an earlier run can be reused only if it is the same model.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from ..errors import MergestreamError
from ..publish import fsync_dir

VERSION_NAME = re.compile(r"step-(\d{6,})-([0-9a-f]+)")
PARTIAL_PREFIX = ".partial-"


class Publisher:
    """Writes versions of the merged model beside `out` and flips the `out` link to the newest."""

    def __init__(self, out: Path, keep: int = 3):
        if keep < 1:
            raise MergestreamError(f"--keep must be at least 1, got {keep}")
        self.out = Path(os.path.abspath(out))
        self.keep = keep
        self.versions = self.out.with_name(self.out.name + ".versions")
        foreign = not self.out.is_symlink() or self._target_name() is None
        if (self.out.exists() or self.out.is_symlink()) and foreign:
            raise MergestreamError(
                f"{out}: exists and is not a link to an export of mergestream watch; "
                "choose a new path for the published model (it becomes a symbolic link "
                f"to the newest export in {self.versions.name}/)"
            )

    def _target_name(self) -> str | None:
        """The version folder OUT points to, if it is one of ours."""
        if not self.out.is_symlink():
            return None
        target = Path(os.readlink(self.out))
        if target.parent.name != self.versions.name or not VERSION_NAME.fullmatch(target.name):
            return None
        return target.name

    def current(self) -> Path | None:
        """The version folder OUT points to now, or None before the first publish."""
        name = self._target_name()
        return self.versions / name if name else None

    def version_name(self, step: int, checkpoint_sha256: str | None) -> str:
        return f"step-{step:06d}-{(checkpoint_sha256 or '0')[:12]}"

    def is_current(self, step: int, checkpoint_sha256: str | None) -> bool:
        return self._target_name() == self.version_name(step, checkpoint_sha256)

    def clean_partials(self) -> None:
        """Remove exports an interrupted run left half-written: only ever under hidden names
        (this publisher's partial folders, and the staging folders of `MergeState.export`)."""
        if self.versions.is_dir():
            for item in self.versions.iterdir():
                if item.name.startswith("."):
                    shutil.rmtree(item, ignore_errors=True)

    def publish(
        self, step: int, checkpoint_sha256: str | None, write: Callable[[Path], object]
    ) -> Path:
        """Write version `step` with `write(folder)` (unless a complete one is there already),
        switch OUT to it, drop old versions; returns the version folder."""
        self.versions.mkdir(parents=True, exist_ok=True)
        final = self.versions / self.version_name(step, checkpoint_sha256)
        if not final.is_dir():
            partial = self.versions / f"{PARTIAL_PREFIX}{final.name}-{os.getpid()}"
            if partial.exists():
                shutil.rmtree(partial)
            write(partial)
            os.rename(partial, final)  # complete, under its own name
            fsync_dir(self.versions)
        self._point_to(final)
        self._prune(final)
        return final

    def _point_to(self, final: Path) -> None:
        link = self.out.with_name(f".{self.out.name}.link-{os.getpid()}")
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(final, self.out.parent), link)
        os.replace(link, self.out)  # the atomic switch
        fsync_dir(self.out.parent)

    def _prune(self, current: Path) -> None:
        versions = sorted(
            (int(m.group(1)), item.name)
            for item in self.versions.iterdir()
            if (m := VERSION_NAME.fullmatch(item.name)) and item.is_dir()
        )
        for _, name in versions[: max(0, len(versions) - self.keep)]:
            if name != current.name:
                shutil.rmtree(self.versions / name, ignore_errors=True)
