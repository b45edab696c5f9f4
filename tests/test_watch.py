"""`mergestream watch`: completeness detection, skip/refuse, atomic publishing, the --then hook,
restarts after SIGKILL, the lock and signals. Real watcher processes on tiny models in temporary
folders; results compared with an independent in-process merge of the same checkpoints."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_SHAPES
from safetensors.torch import load_file, save_file

from mergestream import MergeState, merge
from mergestream.cli import main as cli_main
from mergestream.store.hashing import sha256_files
from mergestream.synthetic import write_stream
from mergestream.watch.inbox import Settler, inspect_entry, inspect_inbox
from mergestream.watch.watcher import EventLog, WatchOptions, run_watch

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
WATCH = [sys.executable, "-m", "mergestream", "watch"]


# ----------------------------------------------------------------------------------- helpers


def zoo(tmp_path: Path, models: int = 4) -> tuple[Path, list[Path]]:
    """base/ and model-XX/ folders (model.safetensors each), plus an empty inbox/."""
    (tmp_path / "inbox").mkdir()
    return write_stream(tmp_path / "zoo", models=models, seed=5, shapes=TINY_SHAPES)


def new_state(tmp_path: Path, base: Path) -> Path:
    MergeState.create(tmp_path / "state", base, method="opcm")
    return tmp_path / "state"


def watch(tmp_path: Path, *flags: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*WATCH, str(tmp_path / "state"), str(tmp_path / "inbox"), *flags],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
    )


def start_watch(tmp_path: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*WATCH, str(tmp_path / "state"), str(tmp_path / "inbox"), "--log-json", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def events(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def journal(state: Path) -> dict:
    return json.loads((state / "watch.json").read_text())


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def watcher_started(state: Path, pid: int | None = None) -> bool:
    """A watcher (the one with `pid`, if given) holds the lock: it writes its pid there."""
    lock = state / "watch.lock"
    if not lock.is_file():
        return False
    holder = lock.read_text().strip()
    return bool(holder) and (pid is None or holder == str(pid))


def merged_steps(state: Path) -> int:
    manifest = state / "manifest.json"
    return json.loads(manifest.read_text())["step"] if manifest.is_file() else 0


def assert_state_equals(state: Path, base: Path, checkpoints: list[Path]) -> None:
    """The state's merged model equals an in-memory merge of `checkpoints` in that order, bit
    for bit, and its ledger holds exactly their content hashes."""
    opened = MergeState.open(state)
    expected = merge(base, checkpoints, "opcm")
    got = opened.state_dict()
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    hashes = [sha256_files(sorted(_weight_files(p))) for p in checkpoints]
    assert [e["sha256"] for e in opened.ledger] == hashes


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")]


def tensors_hash(path: Path) -> str:
    tensors = load_file(str(path))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_sharded(model: Path, out: Path) -> None:
    """`model`'s tensors as two safetensors shards with an HF index, in folder `out`."""
    tensors = load_file(str(model / "model.safetensors"))
    names = list(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    out.mkdir(parents=True)
    weight_map = {}
    for i, half in enumerate(halves, start=1):
        shard = f"model-{i:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in half}, str(out / shard))
        weight_map.update(dict.fromkeys(half, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))


# --------------------------------------------------------------------- completeness, in-process


def test_a_safetensors_file_is_complete_only_with_every_declared_byte(tmp_path):
    _, models = zoo(tmp_path, 1)
    data = (models[0] / "model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    target = tmp_path / "inbox" / "m.safetensors"
    for cut in (0, 5, 8, header_end - 1, header_end, header_end + 7, len(data) - 1):
        target.write_bytes(data[:cut])
        assert not inspect_entry(target).complete, cut
    target.write_bytes(data)
    assert inspect_entry(target).complete


def test_a_torch_zip_is_complete_only_once_closed(tmp_path):
    _, models = zoo(tmp_path, 1)
    tensors = load_file(str(models[0] / "model.safetensors"))
    whole = tmp_path / "whole.bin"
    torch.save(tensors, whole)
    data = whole.read_bytes()
    target = tmp_path / "inbox" / "m.bin"
    for cut in (0, 3, 100, len(data) // 2, len(data) - 22, len(data) - 1):
        target.write_bytes(data[:cut])
        assert not inspect_entry(target).complete, cut
    target.write_bytes(data)
    assert inspect_entry(target).complete


def test_shards_count_only_with_their_index_and_every_shard_whole(tmp_path):
    _, models = zoo(tmp_path, 1)
    full = tmp_path / "full"
    write_sharded(models[0], full)
    target = tmp_path / "inbox" / "sharded"
    target.mkdir()
    shards = sorted(full.glob("model-*.safetensors"))
    for shard in shards:
        shutil.copy(shard, target / shard.name)
    state = inspect_entry(target)
    assert not state.complete and "no index" in state.missing
    # Index first, one shard missing: still incomplete.
    (target / shards[1].name).unlink()
    shutil.copy(full / "model.safetensors.index.json", target)
    assert "missing" in inspect_entry(target).missing
    # The shard half-written: incomplete; whole: complete.
    data = shards[1].read_bytes()
    (target / shards[1].name).write_bytes(data[: len(data) - 10])
    assert not inspect_entry(target).complete
    (target / shards[1].name).write_bytes(data)
    assert inspect_entry(target).complete
    # A lone shard at the top of the inbox is never complete.
    shutil.copy(shards[0], tmp_path / "inbox" / shards[0].name)
    lone = [i for i in inspect_inbox(tmp_path / "inbox") if i.name == shards[0].name]
    assert lone and not lone[0].complete


def test_settling_waits_for_files_to_stay_unchanged(tmp_path):
    _, models = zoo(tmp_path, 2)
    target = tmp_path / "inbox" / "m.safetensors"
    shutil.copy(models[0] / "model.safetensors", target)
    settler = Settler(settle=10.0)
    wall = time.time()
    (item,) = inspect_inbox(tmp_path / "inbox")
    assert settler.settled([item], now=100.0, wall=wall) == []  # just written
    assert settler.settled([item], now=109.0, wall=wall) == []
    assert settler.settled([item], now=110.0, wall=wall) == ["m.safetensors"]
    # Changed content (and mtime): the clock starts again.
    shutil.copy(models[1] / "model.safetensors", target)
    (item,) = inspect_inbox(tmp_path / "inbox")
    assert settler.settled([item], now=111.0, wall=time.time()) == []
    # Files older than the settle time are ready at once (a restart does not wait again).
    old = time.time() - 60
    os.utime(target, (old, old))
    (item,) = inspect_inbox(tmp_path / "inbox")
    assert Settler(10.0).settled([item], now=0.0, wall=time.time()) == ["m.safetensors"]


# ---------------------------------------------------------------------------- watcher processes


def test_once_merges_each_complete_checkpoint_in_name_order_and_exits(tmp_path, capsys):
    base, models = zoo(tmp_path, 3)
    state = new_state(tmp_path, base)
    inbox = tmp_path / "inbox"
    shutil.copytree(models[0], inbox / "a-dir")
    torch.save(load_file(str(models[1] / "model.safetensors")), inbox / "b.bin")
    write_sharded(models[2], inbox / "c-sharded")
    data = (models[2] / "model.safetensors").read_bytes()
    (inbox / "d-truncated.safetensors").write_bytes(data[: len(data) // 2])
    (inbox / "e-no-index").mkdir()
    shutil.copy(inbox / "c-sharded" / "model-00001-of-00002.safetensors", inbox / "e-no-index")
    result = watch(tmp_path, "--once", "--settle", "0", "--order", "name", "--export", "out")
    assert result.returncode == 0, result.stderr
    assert_state_equals(
        state,
        base,
        [inbox / "a-dir", inbox / "b.bin", inbox / "c-sharded"],
    )
    waiting = journal(state)["waiting"]
    assert set(waiting) == {"d-truncated.safetensors", "e-no-index"}
    assert cli_main(["status", str(state)]) == 0
    listed = capsys.readouterr().out
    assert "2 waiting" in listed and "waiting e-no-index: 1 of 2 shards and no index" in listed
    # OUT is the last step's export, as `export` writes it.
    out = tmp_path / "out"
    assert out.is_symlink()
    published = load_file(str(out / "model.safetensors"))
    reference = MergeState.open(state).state_dict()
    assert all(torch.equal(published[n], reference[n]) for n in reference)
    assert "3 fine-tuned" in (out / "README.md").read_text()


def test_once_waits_for_fresh_files_to_settle(tmp_path):
    """In-process (a process start could take longer than the settle time on a busy machine)."""
    base, models = zoo(tmp_path, 1)
    state = new_state(tmp_path, base)
    shutil.copytree(models[0], tmp_path / "inbox" / "fresh", copy_function=shutil.copy)  # new mtime
    landed = time.monotonic()
    stream = io.StringIO()
    options = WatchOptions(state, tmp_path / "inbox", once=True, settle=1.0, poll=0.1)
    assert run_watch(options, EventLog(json_lines=True, stream=stream)) == 0
    assert time.monotonic() - landed >= 1.0
    log = events(stream.getvalue())
    waits = [e for e in log if e["event"] == "waiting"]
    assert [e["checkpoint"] for e in waits] == ["fresh"] and "settling" in waits[0]["reason"]
    assert [e["event"] for e in log].index("waiting") < [e["event"] for e in log].index("merged")
    assert_state_equals(state, base, [tmp_path / "inbox" / "fresh"])


@pytest.mark.parametrize("notifier", ["inotify", "polling"])
def test_a_slow_writer_is_never_read_half_way(tmp_path, notifier):
    """Checkpoints copied in small pieces while the watcher scans every 50 ms with no settle
    time: only the files' own structure keeps it from reading them early."""
    base, models = zoo(tmp_path, 2)
    state = new_state(tmp_path, base)
    inbox = tmp_path / "inbox"
    sharded_source = tmp_path / "sharded-source"
    write_sharded(models[1], sharded_source)

    def copy_slowly(source: Path, target: Path) -> None:
        data = source.read_bytes()
        with open(target, "wb") as f:
            for start in range(0, len(data), 4096):
                f.write(data[start : start + 4096])
                f.flush()
                time.sleep(0.03)

    flags = ["--polling"] if notifier == "polling" else []
    watcher = start_watch(tmp_path, "--settle", "0", "--poll", "0.05", *flags)
    try:
        wait_for(lambda: watcher_started(state), what="the watcher to start")
        copy_slowly(models[0] / "model.safetensors", inbox / "first.safetensors")
        (inbox / "second").mkdir()
        # The index first, as some writers do; then the shards piece by piece.
        shutil.copy(sharded_source / "model.safetensors.index.json", inbox / "second")
        for shard in sorted(sharded_source.glob("model-*.safetensors")):
            copy_slowly(shard, inbox / "second" / shard.name)
        wait_for(lambda: merged_steps(state) == 2, what="both checkpoints merged")
    finally:
        watcher.send_signal(signal.SIGTERM)
        out, err = watcher.communicate(timeout=20)
    assert watcher.returncode == 0, err
    assert not [e for e in events(out) if e["event"] == "refused"]
    assert_state_equals(state, base, [inbox / "first.safetensors", inbox / "second"])
    has_watchdog = importlib.util.find_spec("watchdog") is not None
    used = "inotify" if notifier == "inotify" and has_watchdog else "polling"
    assert events(out)[0]["notifier"] == used


def test_a_duplicate_is_merged_once(tmp_path):
    base, models = zoo(tmp_path, 2)
    state = new_state(tmp_path, base)
    inbox = tmp_path / "inbox"
    shutil.copytree(models[0], inbox / "a")
    shutil.copy(models[0] / "model.safetensors", inbox / "b-copy-of-a.safetensors")
    assert watch(tmp_path, "--once", "--settle", "0", "--order", "name").returncode == 0
    assert merged_steps(state) == 1
    assert journal(state)["checkpoints"]["b-copy-of-a.safetensors"]["outcome"] == "duplicate"
    # Dropped in again under a new name, and a's file rewritten with the same bytes: skipped.
    shutil.copy(models[0] / "model.safetensors", inbox / "c-copy-of-a.safetensors")
    shutil.copy(models[0] / "model.safetensors", inbox / "a" / "model.safetensors")
    shutil.copytree(models[1], inbox / "d")
    result = watch(tmp_path, "--once", "--settle", "0", "--order", "name", "--log-json")
    assert result.returncode == 0, result.stderr
    skipped = {e["checkpoint"] for e in events(result.stdout) if e["event"] == "skipped"}
    assert skipped == {"a", "c-copy-of-a.safetensors"}
    assert_state_equals(state, base, [inbox / "a", inbox / "d"])


def test_a_bad_checkpoint_is_refused_recorded_and_left_alone(tmp_path, capsys):
    base, models = zoo(tmp_path, 3)
    state = new_state(tmp_path, base)
    inbox = tmp_path / "inbox"
    shutil.copytree(models[0], inbox / "a")
    tensors = load_file(str(models[1] / "model.safetensors"))
    name = "encoder.layer.0.attention.self.query.weight"
    with_nan = dict(tensors)
    with_nan[name] = tensors[name].clone()
    with_nan[name][3, 4] = float("nan")
    save_file(with_nan, str(inbox / "b-nan.safetensors"))
    wrong_shape = dict(tensors)
    wrong_shape[name] = torch.zeros(3, 3)
    save_file(wrong_shape, str(inbox / "c-shape.safetensors"))
    (inbox / "d-garbage.safetensors").write_bytes(os.urandom(5000))
    shutil.copytree(models[2], inbox / "e")
    result = watch(tmp_path, "--once", "--settle", "0", "--order", "name", "--log-json")
    assert result.returncode == 3, result.stderr  # --once refused checkpoints
    assert_state_equals(state, base, [inbox / "a", inbox / "e"])
    refused = journal(state)["checkpoints"]
    reasons = {k: v["reason"] for k, v in refused.items() if v["outcome"] == "refused"}
    assert set(reasons) == {"b-nan.safetensors", "c-shape.safetensors", "d-garbage.safetensors"}
    assert "NaN" in reasons["b-nan.safetensors"] and name in reasons["b-nan.safetensors"]
    assert name in reasons["c-shape.safetensors"]
    assert "safetensors" in reasons["d-garbage.safetensors"]
    # `status` lists them, with their reasons.
    assert cli_main(["status", str(state), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["watch"]
    assert shown == {"waiting": {}, "refused": reasons}
    # A second run leaves them alone; a fixed file is tried again and merged.
    again = watch(tmp_path, "--once", "--settle", "0", "--log-json")
    assert [e["event"] for e in events(again.stdout)] == ["start", "stop"]
    assert again.returncode == 0  # nothing was refused by this run
    shutil.copy(models[1] / "model.safetensors", inbox / "b-nan.safetensors")
    assert watch(tmp_path, "--once", "--settle", "0").returncode == 0
    assert_state_equals(state, base, [inbox / "a", inbox / "e", inbox / "b-nan.safetensors"])


def test_sigkill_at_random_moments_then_restart_gives_the_uninterrupted_result(tmp_path):
    base, models = zoo(tmp_path, 5)
    state = new_state(tmp_path, base)
    inbox = tmp_path / "inbox"
    for i, model in enumerate(models):
        shutil.copytree(model, inbox / f"m{i}")
    rng = random.Random(16)
    kills, steps_seen = 0, []
    while merged_steps(state) < len(models) and kills < 10:
        watcher = start_watch(
            tmp_path, "--settle", "0", "--poll", "0.05", "--order", "name", "--export", "out"
        )
        # Killed at a random moment once it is at work: hashing, merging, committing, exporting.
        wait_for(lambda w=watcher: watcher_started(state, w.pid), what="the watcher to start")
        time.sleep(rng.uniform(0.0, 0.25))
        watcher.kill()
        watcher.communicate()
        kills += 1
        steps_seen.append(merged_steps(state))
    assert kills >= 2, steps_seen  # at least one restart happened part-way through
    result = watch(tmp_path, "--once", "--settle", "0", "--order", "name", "--export", "out")
    assert result.returncode == 0, result.stderr
    checkpoints = [inbox / f"m{i}" for i in range(len(models))]
    assert_state_equals(state, base, checkpoints)
    # An uninterrupted run from scratch gives the same bits.
    reference_dir = tmp_path / "reference"
    reference = MergeState.create(reference_dir, base, method="opcm")
    for checkpoint in checkpoints:
        reference.add(checkpoint)
    final = MergeState.open(state)
    assert final.scalars == reference.scalars
    ref_tensors = reference.state_dict()
    for name, tensor in final.state_dict().items():
        assert torch.equal(tensor, ref_tensors[name]), name
    published = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(published[n], ref_tensors[n]) for n in ref_tensors)
    versions = tmp_path / "out.versions"
    hidden = [p.name for p in versions.iterdir() if p.name.startswith(".")]
    assert not hidden, hidden  # no partial exports


def test_a_reader_of_out_never_sees_a_mixture(tmp_path):
    base, models = zoo(tmp_path, 4)
    new_state(tmp_path, base)
    inbox = tmp_path / "inbox"
    out = tmp_path / "out"
    seen: list[str] = []
    stop = threading.Event()

    errors: list[BaseException] = []

    def read_out() -> None:
        while not stop.is_set():
            try:
                # As README tells readers: resolve the link once, then read through the
                # version folder (safetensors' loader opens the file twice, header then data).
                seen.append(tensors_hash(Path(os.path.realpath(out)) / "model.safetensors"))
            except FileNotFoundError:
                if seen:  # only before the first publish may OUT be missing
                    errors.append(AssertionError("OUT vanished after a publish"))
            except Exception as err:  # noqa: BLE001 - a torn file would show up here
                errors.append(err)

    reader = threading.Thread(target=read_out)
    watcher = start_watch(tmp_path, "--settle", "0", "--poll", "0.05", "--export", str(out),
                          "--keep", "10")  # fmt: skip
    reader.start()
    try:
        for i, model in enumerate(models):
            staging = tmp_path / f"staging-{i}"
            shutil.copytree(model, staging)
            staging.rename(inbox / f"m{i}")  # lands whole, at once
            wait_for(lambda i=i: merged_steps(tmp_path / "state") == i + 1, what=f"step {i + 1}")
        wait_for(lambda: len(list((tmp_path / "out.versions").glob("step-*"))) == len(models))
        time.sleep(0.3)
    finally:
        stop.set()
        reader.join()
        watcher.send_signal(signal.SIGTERM)
        watcher.communicate(timeout=20)
    published = {
        tensors_hash(p / "model.safetensors") for p in (tmp_path / "out.versions").glob("step-*")
    }
    assert len(published) == len(models)
    assert not errors, errors[:3]
    assert seen and set(seen) <= published
    assert len(set(seen)) >= 2  # the reader really read across publishes


def test_then_gets_the_step_export_and_checkpoint_and_a_failure_is_reported(tmp_path):
    base, models = zoo(tmp_path, 2)
    state = new_state(tmp_path, base)
    inbox = tmp_path / "inbox"
    shutil.copytree(models[0], inbox / "a")
    shutil.copytree(models[1], inbox / "b")
    record = tmp_path / "then.jsonl"
    hook = (
        f"{sys.executable} -c \"import json, os; print('evaluating'); "
        f"open({str(record)!r}, 'a').write(json.dumps({{k: os.environ[k] for k in "
        "('MERGESTREAM_STEP', 'MERGESTREAM_EXPORT', 'MERGESTREAM_CHECKPOINT')}) + chr(10))\"; "
        'test "$MERGESTREAM_STEP" != 1'
    )
    result = watch(
        tmp_path, "--once", "--settle", "0", "--order", "name", "--export", "out", "--then", hook
    )
    assert result.returncode == 0, result.stderr
    assert merged_steps(state) == 2  # the failing hook after step 1 did not stop the watcher
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    ledger = MergeState.open(state).ledger
    assert [c["MERGESTREAM_STEP"] for c in calls] == ["1", "2"]
    for call, entry in zip(calls, ledger, strict=True):
        version = Path(call["MERGESTREAM_EXPORT"])
        assert version.parent == tmp_path / "out.versions"
        assert version.name.startswith(f"step-{entry['step']:06d}-")
        assert call["MERGESTREAM_CHECKPOINT"] == entry["path"]
    assert (tmp_path / "out").resolve() == Path(calls[-1]["MERGESTREAM_EXPORT"])
    assert "failed with exit status 1" in result.stdout
    for step in (1, 2):
        assert (state / "watch-logs" / f"step-{step:06d}.log").read_text() == "evaluating\n"
    # With --then-strict the first failure stops the watcher with an error.
    shutil.rmtree(state)
    shutil.rmtree(tmp_path / "out.versions")
    (tmp_path / "out").unlink()
    new_state(tmp_path, base)
    strict = watch(
        tmp_path, "--once", "--settle", "0", "--order", "name", "--then", hook, "--then-strict"
    )
    assert strict.returncode == 2 and "--then-strict" in strict.stderr
    assert merged_steps(state) == 1


def test_a_second_watcher_is_refused_and_sigterm_stops_cleanly(tmp_path):
    base, models = zoo(tmp_path, 1)
    state = new_state(tmp_path, base)
    first = start_watch(tmp_path, "--poll", "0.1")
    try:
        wait_for(lambda: watcher_started(state), what="the first watcher")
        second = watch(tmp_path, "--once")
        assert second.returncode == 2
        assert "another watcher" in second.stderr and str(first.pid) in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=20)
    assert first.returncode == 0, err
    assert [e["event"] for e in events(out)][-1] == "stop"
    # The lock went with the process: a new watcher starts.
    assert watch(tmp_path, "--once").returncode == 0


def test_sigint_during_a_step_abandons_it_and_the_state_stays_whole(tmp_path):
    """A hook that sleeps keeps the watcher inside a step; SIGINT there ends it with status 0,
    and the next run carries on from the committed state."""
    base, models = zoo(tmp_path, 2)
    state = new_state(tmp_path, base)
    inbox = tmp_path / "inbox"
    shutil.copytree(models[0], inbox / "a")
    shutil.copytree(models[1], inbox / "b")
    watcher = start_watch(tmp_path, "--settle", "0", "--order", "name", "--then", "sleep 30")
    wait_for(lambda: merged_steps(state) == 1, what="step 1")
    time.sleep(0.5)
    started = time.monotonic()
    watcher.send_signal(signal.SIGINT)
    out, err = watcher.communicate(timeout=20)
    assert watcher.returncode == 0, err
    assert time.monotonic() - started < 10  # the 30 s hook was abandoned
    assert merged_steps(state) == 1
    assert watch(tmp_path, "--once", "--settle", "0", "--order", "name").returncode == 0
    assert_state_equals(state, base, [inbox / "a", inbox / "b"])


def test_sigterm_during_an_add_abandons_it_and_leaves_it_undecided(tmp_path, monkeypatch):
    """In-process, with `add` slowed down from the outside: SIGTERM arrives while the step is in
    flight; the watcher returns 0 at once, the state is still at step 0, and the checkpoint is
    merged by the next run."""
    base, models = zoo(tmp_path, 1)
    state = new_state(tmp_path, base)
    shutil.copytree(models[0], tmp_path / "inbox" / "a")
    real_add = MergeState.add

    def slow_add(self, *args, **kwargs):
        time.sleep(20)
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(MergeState, "add", slow_add)
    options = WatchOptions(state, tmp_path / "inbox", settle=0, poll=0.1)
    stream = io.StringIO()
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    started = time.monotonic()
    timer.start()
    assert run_watch(options, EventLog(json_lines=True, stream=stream)) == 0
    assert time.monotonic() - started < 10
    assert [e["event"] for e in events(stream.getvalue())] == ["start", "adding", "stop"]
    assert merged_steps(state) == 0
    assert not (state / "watch.json").exists()  # nothing was decided
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was put back
    monkeypatch.setattr(MergeState, "add", real_add)
    assert run_watch(WatchOptions(state, tmp_path / "inbox", once=True, settle=0)) == 0
    assert_state_equals(state, base, [tmp_path / "inbox" / "a"])


def test_options_from_a_yaml_config(tmp_path):
    base, models = zoo(tmp_path, 2)
    state = new_state(tmp_path, base)
    shutil.copytree(models[1], tmp_path / "inbox" / "x")
    shutil.copytree(models[0], tmp_path / "inbox" / "y")
    config = tmp_path / "watch.yaml"
    config.write_text(
        "state: state\ninbox: inbox\nexport: out\nonce: true\nsettle: 0\norder: name\n"
    )
    result = subprocess.run(
        [*WATCH, "--config", str(config)], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert_state_equals(state, base, [tmp_path / "inbox" / "x", tmp_path / "inbox" / "y"])
    assert (tmp_path / "out" / "model.safetensors").is_file()
    config.write_text("state: state\ninbox: inbox\nsettel: 3\n")
    bad = subprocess.run(
        [*WATCH, "--config", str(config)], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert bad.returncode == 2 and "settel" in bad.stderr


def test_out_must_not_be_a_foreign_directory(tmp_path):
    base, _ = zoo(tmp_path, 1)
    new_state(tmp_path, base)
    (tmp_path / "out").mkdir()
    result = watch(tmp_path, "--once", "--export", "out")
    assert result.returncode == 2 and "not a link" in result.stderr


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Relative paths given to the watcher (out) resolve in the test's folder."""
    monkeypatch.chdir(tmp_path)
