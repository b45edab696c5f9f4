"""Publishing exports so that a reader of OUT sees one whole model, never a mixture.

OUT is a symbolic link. Each export is written into a folder beside it, `OUT.versions/`, first
under a hidden temporary name, renamed to `step-000007-<id>` once complete, and then OUT is
switched to it by renaming a new link over the old one (one atomic `rename`). A reader that opens
OUT/model.safetensors gets the previous complete model or the new one. For sharded exports, a
reader should resolve OUT once (`os.path.realpath`) and read every shard through that path. The
last `keep` versions are kept (and always the one OUT points to), so a reader that resolved OUT a
moment ago still finds its files.

`<id>` is a digest of what the version was made from: the state's identity, its step, its
generation's checksums, and the export's settings (full model or adapter, dtype, shard size). A
version folder therefore names exactly one published model, and one left by an earlier run is
reused only if it is that model.

OUT belongs to one state. `OUT.versions/owner.json` names it (its identity and path) and lists
the versions written for it; a watcher of another state is refused, even one at the same path
(a state removed and created again is another state), and only the versions listed there are
ever pruned.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import MergestreamError
from ..store.atomic import fsync_dir
from .journal import now_iso, write_json_atomic

VERSION_NAME = re.compile(r"step-(\d{6,})-([0-9a-f]+)")
PARTIAL_PREFIX = ".partial-"
OWNER = "owner.json"
OWNER_FORMAT = "mergestream-watch-versions"


def version_name(model: Mapping[str, Any], export: Mapping[str, Any]) -> str:
    """`step-000007-<id>`: the step, and a digest of the model's identity and export settings."""
    made_from = json.dumps({"model": model, "export": export}, sort_keys=True)
    return f"step-{int(model['step']):06d}-{hashlib.sha256(made_from.encode()).hexdigest()[:16]}"


class Publisher:
    """Writes versions of the merged model beside `out` and flips the `out` link to the newest.

    `state_id` and `state_path` name the state that publishes; OUT must be new or already its."""

    def __init__(self, out: Path, keep: int, state_id: str, state_path: Path):
        if keep < 1:
            raise MergestreamError(f"--keep must be at least 1, got {keep}")
        self.given = out
        self.out = Path(os.path.abspath(out))
        self.keep = keep
        self.versions = self.out.with_name(self.out.name + ".versions")
        self.owner_path = self.versions / OWNER
        self.state_id = state_id
        self.state_path = Path(os.path.abspath(state_path))
        foreign = not self.out.is_symlink() or self._target_name() is None
        if (self.out.exists() or self.out.is_symlink()) and foreign:
            raise MergestreamError(
                f"{out}: exists and is not a link to an export of mergestream watch; "
                "choose a new path for the published model (it becomes a symbolic link "
                f"to the newest export in {self.versions.name}/)"
            )
        try:
            self.record = self._claim()
        except OSError as err:
            raise MergestreamError(
                f"{self.versions}: cannot record which state publishes there "
                f"({err.strerror or err}); check the folder's permissions, or choose another "
                "--export path"
            ) from None

    # ------------------------------------------------------------------------- ownership

    def _claim(self) -> dict[str, Any]:
        """The owner record of OUT.versions, created for this state if there is none yet;
        refuses OUT if it belongs to another state or holds versions nobody recorded."""
        self.versions.mkdir(parents=True, exist_ok=True)
        record = self._read_owner()
        if record is None:
            unrecorded = sorted(p.name for p in self._version_dirs())
            if unrecorded:
                raise MergestreamError(
                    f"{self.given}: {self.versions} holds exports ({', '.join(unrecorded[:3])}"
                    f"{', ...' if len(unrecorded) > 3 else ''}) that no {OWNER} ties to a state "
                    "(an older mergestream wrote them); choose another --export path, or remove "
                    f"{self.given} and {self.versions} to publish this state there"
                )
            record = {
                "format": OWNER_FORMAT,
                "format_version": 1,
                "state": {"id": self.state_id, "path": str(self.state_path)},
                "claimed": now_iso(),
                "versions": {},
            }
            if not self._create_owner(record):  # another watcher claimed it just now
                record = self._read_owner()
                assert record is not None
        owner = record["state"]
        if owner.get("id") != self.state_id:
            raise MergestreamError(self._foreign_message(owner))
        if owner.get("path") != str(self.state_path):  # the same state, moved: follow it
            owner["path"] = str(self.state_path)
            write_json_atomic(self.owner_path, record)
        return record

    def _foreign_message(self, owner: Mapping[str, Any]) -> str:
        where = owner.get("path", "?")
        if where == str(self.state_path):
            whose = (
                f"an earlier state at {where} (removed and created again since: another "
                "state, though at the same path)"
            )
        else:
            whose = f"the state {where}"
        return (
            f"{self.given}: publishes the merge of {whose}, not of this state; each state needs "
            f"an --export path of its own: choose another, or remove {self.given} and "
            f"{self.versions} to publish this state there"
        )

    def _read_owner(self) -> dict[str, Any] | None:
        if not self.owner_path.exists():
            return None
        try:
            record = json.loads(self.owner_path.read_text())
        except (OSError, ValueError) as err:
            raise MergestreamError(
                f"{self.owner_path}: unreadable ({err}); it records which state {self.given} "
                f"belongs to: remove {self.given} and {self.versions}, or choose another "
                "--export path"
            ) from None
        valid = (
            isinstance(record, dict)
            and record.get("format") == OWNER_FORMAT
            and isinstance(record.get("state"), dict)
            and isinstance(record.get("versions"), dict)
        )
        if not valid:
            raise MergestreamError(
                f"{self.owner_path}: not an owner record of mergestream watch; remove "
                f"{self.given} and {self.versions}, or choose another --export path"
            )
        return record

    def _create_owner(self, record: dict[str, Any]) -> bool:
        """Write the owner record unless one exists; False if another process got there first.
        A hard link of a complete file makes the claim atomic: no reader sees half a record."""
        tmp = self.versions / f".{OWNER}.claim-{os.getpid()}"
        write_json_atomic(tmp, record)
        try:
            os.link(tmp, self.owner_path)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        fsync_dir(self.versions)
        return True

    def _save(self) -> None:
        write_json_atomic(self.owner_path, self.record)

    # -------------------------------------------------------------------------- versions

    def _version_dirs(self) -> list[Path]:
        if not self.versions.is_dir():
            return []
        return [p for p in self.versions.iterdir() if VERSION_NAME.fullmatch(p.name) and p.is_dir()]

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

    def is_current(self, model: Mapping[str, Any], export: Mapping[str, Any]) -> bool:
        """Whether OUT shows this very model already (same state, generation and settings)."""
        name = version_name(model, export)
        return self._target_name() == name and name in self.record["versions"]

    def clean_partials(self) -> None:
        """Remove what an interrupted run left half-written: only ever under hidden names (this
        publisher's partial folders, the staging folders of the exports, temporary copies of
        the owner record)."""
        if self.versions.is_dir():
            for item in self.versions.iterdir():
                if not item.name.startswith("."):
                    continue
                if item.is_dir() and not item.is_symlink():
                    shutil.rmtree(item, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        item.unlink()

    def publish(
        self,
        model: Mapping[str, Any],
        export: Mapping[str, Any],
        write: Callable[[Path], object],
    ) -> Path:
        """Write the version of `model` with these `export` settings by `write(folder)` (unless
        this publisher wrote it already), switch OUT to it, drop old versions; returns the
        version folder."""
        self.versions.mkdir(parents=True, exist_ok=True)
        final = self.versions / version_name(model, export)
        versions = self.record["versions"]
        if final.is_dir() and final.name not in versions:
            raise MergestreamError(
                f"{final}: a version folder {self.owner_path.name} does not list (not written "
                f"by mergestream watch for this state); move it out of {self.versions}"
            )
        if not final.is_dir():
            partial = self.versions / f"{PARTIAL_PREFIX}{final.name}-{os.getpid()}"
            if partial.exists():
                shutil.rmtree(partial)
            write(partial)
            # Listed before it gets its name, so no complete version is ever unlisted.
            versions.pop(final.name, None)
            versions[final.name] = {
                "step": model["step"],
                "generation": model["generation"],
                "checksums": model["checksums"],
                "export": dict(export),
                "written": now_iso(),
            }
            self._save()
            os.rename(partial, final)  # complete, under its own name
            fsync_dir(self.versions)
        else:
            versions[final.name] = versions.pop(final.name)  # the newest again
            self._save()
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
        """Remove the versions this state published beyond the newest `keep` (never the current
        one, never a folder the owner record does not list)."""
        versions = self.record["versions"]
        listed = list(versions)  # oldest first: a version is moved last when published
        old = [n for n in listed[: max(0, len(listed) - self.keep)] if n != current.name]
        for name in old:
            shutil.rmtree(self.versions / name, ignore_errors=True)
            del versions[name]
        if old:
            self._save()
