"""What a failed step leaves behind (nothing), and a manifest that was edited by hand.

A step that fails, whatever failed (the reservation of its files on a full disk, a write, the
sync, the manifest, or an exception of any kind after its files exist), removes the generation
it created before it returns, and the state goes on at its previous step. A manifest changed
outside mergestream (its step, its scalars, its method) is refused, naming the file and what
does not fit.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from helpers import mounted_tmpfs

import mergestream.state as state_module
import mergestream.store.storage as storage_module
from mergestream import MergeState, StateError
from mergestream.cli import main


def files_of(state_dir: Path) -> dict[str, bytes]:
    """Every file of a state but its lock, with its bytes."""
    return {
        str(p.relative_to(state_dir)): p.read_bytes()
        for p in sorted(state_dir.rglob("*"))
        if p.is_file() and p.name != "lock"
    }


def no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def fail_after(calls: int, error: BaseException):
    """A stand-in for a system call that succeeds `calls` times, then raises `error`."""

    def install(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
        real = getattr(owner, name)
        count = [0]

        def wrapper(*args: object, **kwargs: object) -> object:
            count[0] += 1
            if count[0] > calls:
                raise error
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    return install


def full_disk(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Make one phase of the next step fail as on a full disk (or with an I/O error)."""
    if where == "reservation":
        monkeypatch.setattr(os, "posix_fallocate", no_space)
    elif where == "part write":  # the header is written, the first tensor's bytes are not
        fail_after(1, OSError(errno.ENOSPC, "No space left on device"))(monkeypatch, os, "pwrite")
    elif where == "part sync":
        fail_after(0, OSError(errno.EIO, "Input/output error"))(monkeypatch, os, "fsync")
    elif where == "manifest write":

        def half_written(data: object, f, **kwargs: object) -> None:  # noqa: ANN001
            f.write('{"format": ')
            no_space()

        monkeypatch.setattr(storage_module.json, "dump", half_written)
    elif where == "manifest rename":
        real_replace = os.replace

        def refuse_manifest(src: object, dst: object) -> None:
            if Path(str(dst)).name == "manifest.json":
                no_space()
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", refuse_manifest)
    else:  # an exception of this process once the generation's files are complete

        def interrupted(*args: object, **kwargs: object) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(state_module, "dtype_notes", interrupted)


PHASES = [
    "reservation",
    "part write",
    "part sync",
    "manifest write",
    "manifest rename",
    "after the files exist",
]


@pytest.mark.parametrize("method", ["opcm", "task_arithmetic"])
@pytest.mark.parametrize("where", PHASES)
def test_a_failed_step_leaves_nothing_behind(tiny_stream, tmp_path, monkeypatch, where, method):
    base, checkpoints = tiny_stream
    state = MergeState.create(tmp_path / "s", base, method)
    for checkpoint in checkpoints[:2]:
        state.add(checkpoint)
    before = files_of(tmp_path / "s")
    merged_before = state.state_dict()
    with monkeypatch.context() as patched:
        full_disk(patched, where)
        expected = KeyboardInterrupt if where == "after the files exist" else StateError
        with pytest.raises(expected):
            state.add(checkpoints[2])
    assert not (tmp_path / "s" / "gen-000003").exists()
    assert files_of(tmp_path / "s") == before, "the failed step left files behind or changed some"
    reopened = MergeState.open(tmp_path / "s")
    assert reopened.step == 2
    for name, tensor in reopened.state_dict().items():
        assert torch.equal(tensor, merged_before[name]), name
    reopened.add(checkpoints[2])  # the same step again, now with room
    reference = MergeState.create(tmp_path / "r", base, method)
    for checkpoint in checkpoints[:3]:
        reference.add(checkpoint)
    assert reopened.step == 3
    merged, expected_merge = reopened.state_dict(), reference.state_dict()
    for name, tensor in expected_merge.items():
        assert torch.equal(merged[name], tensor), name


def test_a_full_disk_at_the_manifest_is_one_line_and_no_leftover(
    tiny_stream, tmp_path, monkeypatch, capsys
):
    base, checkpoints = tiny_stream
    state_dir = tmp_path / "s"
    assert main(["init", str(state_dir), "--base", str(base), "--quiet"]) == 0
    assert main(["add", str(state_dir), str(checkpoints[0]), "--quiet"]) == 0
    capsys.readouterr()
    before = files_of(state_dir)
    with monkeypatch.context() as patched:
        full_disk(patched, "manifest write")
        assert main(["add", str(state_dir), str(checkpoints[1]), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mergestream: error: no space left on"), err
    assert "the state is unchanged since its last completed step" in err[0]
    assert files_of(state_dir) == before
    assert sorted(p.name for p in state_dir.iterdir()) == ["gen-000001", "lock", "manifest.json"]


def test_a_step_that_failed_after_the_rename_keeps_its_generation(
    tiny_stream, tmp_path, monkeypatch
):
    """Once the manifest names the new generation, it is the state: a failure after the rename
    (syncing the directory) must not remove it."""
    base, checkpoints = tiny_stream
    state = MergeState.create(tmp_path / "s", base, "opcm")
    state.add(checkpoints[0])
    real_fsync = os.fsync
    renamed = []
    real_replace = os.replace

    def replace(src: object, dst: object) -> None:
        real_replace(src, dst)
        renamed.append(Path(str(dst)).name)

    def fsync(fd: int) -> None:
        if renamed and renamed[-1] == "manifest.json":
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    with monkeypatch.context() as patched:
        patched.setattr(os, "replace", replace)
        patched.setattr(os, "fsync", fsync)
        with pytest.raises(StateError):
            state.add(checkpoints[1])
    reopened = MergeState.open(tmp_path / "s")
    assert reopened.step == 2
    assert (tmp_path / "s" / "gen-000002").is_dir()
    reopened.state_dict()  # every file it names is there and intact


@pytest.mark.parametrize("where", ["reservation", "part write", "manifest write"])
def test_a_failed_prepare_leaves_nothing_behind(tiny_stream, tmp_path, monkeypatch, capsys, where):
    base, checkpoints = tiny_stream
    state_dir = tmp_path / "s"
    assert main(["init", str(state_dir), "--base", str(base), "--quiet"]) == 0
    assert main(["add", str(state_dir), *map(str, checkpoints[:2]), "--quiet"]) == 0
    capsys.readouterr()
    before = files_of(state_dir)
    with monkeypatch.context() as patched:
        full_disk(patched, where)
        assert main(["prepare", str(state_dir), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mergestream: error: no space left on"), err
    assert "unchanged" in err[0]
    if where != "manifest write":
        assert "while writing the prepared factors" in err[0]
    assert files_of(state_dir) == before, "the failed prepare left files behind"
    assert main(["prepare", str(state_dir), "--quiet"]) == 0  # with room, it prepares
    assert "prepared" in json.loads((state_dir / "manifest.json").read_text())


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 2 MiB file system (tmpfs; mounting needs root), unmounted afterwards."""
    with mounted_tmpfs(tmp_path / "small", "2m") as mount:
        yield mount


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def test_a_real_full_disk_at_every_margin_leaves_nothing_behind(tiny_stream, small_disk):
    """On a tmpfs filled to leave room for the new generation plus 0, 1, 2... pages, every add
    either completes or fails leaving the state exactly as it was (a margin too small for the
    manifest used to leave the new generation's files on the full disk)."""
    base, checkpoints = tiny_stream
    state = MergeState.create(small_disk / "s", base, "opcm")
    state.add(checkpoints[0])
    page = os.statvfs(small_disk).f_frsize
    generation = sum(p.stat().st_size for p in (small_disk / "s").glob("gen-*/*"))
    manifest = (small_disk / "s" / "manifest.json").stat().st_size
    pages = -(-generation // page)
    outcomes = []
    for margin in range(0, -(-manifest // page) + 3):
        before = files_of(small_disk / "s")
        step = MergeState.open(small_disk / "s").step
        filler = small_disk / "filler"
        room = free_bytes(small_disk) - (pages + margin) * page
        assert room > 0, "the test's disk is too small for its state"
        filler.write_bytes(b"\0" * room)
        try:
            MergeState.open(small_disk / "s").add(checkpoints[1])
            outcomes.append("added")
        except StateError as err:
            assert "no space left on" in str(err) and "unchanged" in str(err), err
            outcomes.append("refused")
            assert files_of(small_disk / "s") == before, f"margin {margin}: leftovers"
            assert MergeState.open(small_disk / "s").step == step
        filler.unlink()
        if outcomes[-1] == "added":
            break
    assert outcomes[0] == "refused" and outcomes[-1] == "added", outcomes
    assert sorted(p.name for p in small_disk.iterdir()) == ["s"]


# ------------------------------------------------------------------- a manifest edited by hand


@pytest.fixture
def two_steps(tiny_stream, tmp_path):
    """An OPCM state at step 2, made through the command line, and its checkpoints."""
    base, checkpoints = tiny_stream
    state_dir = tmp_path / "s"
    assert main(["init", str(state_dir), "--base", str(base), "--quiet"]) == 0
    assert main(["add", str(state_dir), *map(str, checkpoints[:2]), "--quiet"]) == 0
    return state_dir, checkpoints


def edit_manifest(state_dir: Path, change, keep_checksum: bool = True) -> None:  # noqa: ANN001
    path = state_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    if not keep_checksum:  # as a manifest written before manifests carried one
        del manifest["checksum"]
    path.write_text(json.dumps(manifest, indent=2))


def refused_everywhere(state_dir: Path, checkpoint: Path, capsys) -> str:  # noqa: ANN001
    """The one error line that status, add and export each give for the state."""
    capsys.readouterr()
    lines = set()
    for argv in (
        ["status", str(state_dir)],
        ["add", str(state_dir), str(checkpoint), "--quiet"],
        ["export", str(state_dir), str(state_dir.parent / "out"), "--quiet"],
    ):
        before = files_of(state_dir)
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mergestream: error: "), err
        lines.add(err[0])
        assert files_of(state_dir) == before
    assert not (state_dir.parent / "out").exists()
    assert len(lines) == 1, lines
    return lines.pop()


@pytest.mark.parametrize("keep_checksum", [True, False])
def test_edited_scalars_are_refused(two_steps, capsys, keep_checksum):
    state_dir, checkpoints = two_steps
    edit_manifest(state_dir, lambda m: m["scalars"].update(scale=5), keep_checksum)
    line = refused_everywhere(state_dir, checkpoints[2], capsys)
    assert line.startswith(f"mergestream: error: {state_dir / 'manifest.json'}: scalars ")
    assert "scale=5" in line and "differ from those the ledger recorded at step 2" in line
    assert "changed outside mergestream" in line


@pytest.mark.parametrize("keep_checksum", [True, False])
def test_an_edited_step_is_refused(two_steps, capsys, keep_checksum):
    state_dir, checkpoints = two_steps
    edit_manifest(state_dir, lambda m: m.update(step=7), keep_checksum)
    line = refused_everywhere(state_dir, checkpoints[2], capsys)
    assert f"{state_dir / 'manifest.json'}: step is 7 but the ledger records 2 steps" in line


def test_another_method_is_refused_naming_the_manifest(two_steps, capsys):
    state_dir, checkpoints = two_steps
    edit_manifest(state_dir, lambda m: m["method"].update(name="ties"))
    line = refused_everywhere(state_dir, checkpoints[2], capsys)
    assert f"{state_dir / 'manifest.json'}: its content does not match the checksum" in line
    # Without a checksum (an older manifest), the method cannot be set up: the manifest is named.
    edit_manifest(state_dir, lambda m: None, keep_checksum=False)
    with pytest.raises(StateError) as raised:
        MergeState.open(state_dir)
    message = str(raised.value)
    assert message.startswith(f"{state_dir / 'manifest.json'}: the state's method cannot be set")
    assert "unknown parameter 'alpha'" in message


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["method"]["params"].update(alpha=0.9),
        lambda m: m["ledger"][0].update(sha256="0" * 64),
        lambda m: m["base"].update(sha256="0" * 64),
        lambda m: m["parts"][0]["crc32"].popitem(),
    ],
)
def test_any_other_edit_fails_the_checksum(two_steps, capsys, change):
    state_dir, checkpoints = two_steps
    edit_manifest(state_dir, change)
    line = refused_everywhere(state_dir, checkpoints[2], capsys)
    assert f"{state_dir / 'manifest.json'}: its content does not match the checksum" in line


def test_a_manifest_without_a_checksum_opens_and_gains_one(two_steps, tiny_stream):
    state_dir, checkpoints = two_steps
    edit_manifest(state_dir, lambda m: None, keep_checksum=False)
    state = MergeState.open(state_dir)
    assert state.step == 2
    state.add(checkpoints[2])
    manifest = json.loads((state_dir / "manifest.json").read_text())
    assert len(manifest["checksum"]) == 64
    edit_manifest(state_dir, lambda m: m["scalars"].update(norm_sum=1.0))
    with pytest.raises(StateError, match="scalars"):
        MergeState.open(state_dir)


def test_the_base_path_may_be_edited_to_follow_a_moved_base(two_steps, tiny_stream, tmp_path):
    """The base's path is left out of the checksum: its content is checked at every add."""
    state_dir, checkpoints = two_steps
    base, _ = tiny_stream
    moved = tmp_path / "moved-base"
    base.rename(moved)
    with pytest.raises(StateError, match="the state's base cannot be opened"):
        MergeState.open(state_dir)
    edit_manifest(state_dir, lambda m: m["base"].update(path=str(moved)))
    state = MergeState.open(state_dir)
    state.add(checkpoints[2])
    assert state.step == 3
