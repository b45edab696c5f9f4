"""An `add` killed at any instant leaves the previous state intact and usable; two adds never run
on one state at once.

The adds run as real processes executing the real command line (`mergestream.cli.main`), killed
with SIGKILL. To keep dozens of kills fast, they are forked from a server process that has already
imported mergestream (an interpreter start costs seconds here, an add of a tiny model
milliseconds). In the forked process the test makes each phase slow and announces it: progress
steps sleep (hashing reads small chunks, so it has many), and fsync, rename and directory removal
sleep before acting. Kills then land deterministically in every phase (hashing, the tensor pass
with its writes, the fsyncs of the new generation, the manifest rename, the cleanup), and also at
uniformly random instants of the whole add.

After every kill: the state opens, holds the weights of before the add (or, if the kill came after
the manifest rename, of after it), exports them, and the same add run again completes it (or, if
it had completed, is refused as a duplicate). The lock test starts the second add as a fresh
`python -m mergestream` process.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergestream
from mergestream import MergeState, StateError
from mergestream.synthetic import apply, make_base, make_task_vector, transformer_shapes

SHAPES = transformer_shapes(layers=2, hidden=16, intermediate=24, vocab=30, positions=8)
SRC = str(Path(mergestream.__file__).resolve().parent.parent)
DELAY = 0.004  # seconds each announced phase step sleeps in a slowed add

FORK_SERVER = r"""
import json, os, signal, sys, time, traceback
import torch
torch.set_num_threads(1)  # no thread pool exists when the adds are forked
import mergestream.cli as cli
import mergestream.store.hashing as hashing
import mergestream.store.storage as storage

def say(text):
    os.write(1, (text + "\n").encode())

class AnnouncingProgress:
    def __init__(self, delay):
        self.delay = delay
    def start(self, label, total_items, total_bytes):
        say("PHASE start:" + label.split()[0])
    def advance(self, items, nbytes):
        time.sleep(self.delay)
    def finish(self):
        say("PHASE finish")

def slowed(fn, label, delay):
    def wrapper(*args, **kwargs):
        say("PHASE " + label)
        time.sleep(delay)
        return fn(*args, **kwargs)
    return wrapper

def child(request):
    fd = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    delay = request["delay"]
    if delay:
        hashing.CHUNK = 1024
        cli.default_progress = lambda quiet=False: AnnouncingProgress(delay)
        os.fsync = slowed(os.fsync, "fsync", delay)
        os.replace = slowed(os.replace, "replace", delay)
        storage.shutil.rmtree = slowed(storage.shutil.rmtree, "rmtree", delay)
    return cli.main(request["argv"])

for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            code = child(request)
        except BaseException:
            traceback.print_exc()
            code = 99
        sys.stderr.flush()
        say("PHASE done")
        os._exit(code)
    say("PID %d" % pid)
    # The child is reaped only after this answer, so its pid cannot be reused before a kill.
    if sys.stdin.readline().strip() == "KILL":
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    say("EXIT %d" % os.waitstatus_to_exitcode(status))
"""


class ForkServer:
    """Runs `mergestream` commands as processes forked from a warm interpreter."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FORK_SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=SRC),
        )
        self._buffer = b""
        self._runs = 0
        self.pid: int | None = None
        self.stderr: Path | None = None

    def _line(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError("the fork server died")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def start(self, argv: list[str], delay: float = 0.0) -> None:
        self._runs += 1
        self.stderr = self.tmp / f"stderr-{self._runs}.txt"
        request = {"argv": argv, "delay": delay, "stderr": str(self.stderr)}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        self.phases: list[tuple[float, str]] = []
        self.exit_code: int | None = None
        self._answered = False
        while True:  # the forked command may announce phases before its pid arrives
            line = self._line(60)
            assert line is not None, "the fork server did not answer"
            if line.startswith("PID "):
                self.pid = int(line.split()[1])
                self.started = time.monotonic()
                return
            self._record(line)

    def wait_for(self, phase: str, occurrence: int = 1, timeout: float = 30) -> bool:
        """Block until the running command announces `phase` for the `occurrence`-th time;
        False if it finished first."""
        deadline = time.monotonic() + timeout
        while True:
            if sum(1 for _, p in self.phases if p == phase) >= occurrence:
                return True
            if self.done:
                return False
            line = self._line(deadline - time.monotonic())
            assert line is not None, f"no {phase!r} within {timeout}s"
            self._record(line)

    def _record(self, line: str) -> None:
        if line.startswith("PHASE "):
            self.phases.append((time.monotonic(), line[6:]))
        elif line.startswith("EXIT "):
            self.exit_code = int(line.split()[1])

    @property
    def done(self) -> bool:
        return any(p == "done" for _, p in self.phases)

    def _answer(self, word: str) -> None:
        if not self._answered:
            self._answered = True
            self.proc.stdin.write(f"{word}\n".encode())
            self.proc.stdin.flush()

    def kill(self) -> None:
        """SIGKILL the command (the fork server sends it; a finished command is unaffected)."""
        self._answer("KILL")

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        self._answer("WAIT")
        while self.exit_code is None:
            line = self._line(timeout)
            assert line is not None, "the command did not finish"
            self._record(line)
        return self.exit_code, self.stderr.read_text()

    def run(self, argv: list[str], delay: float = 0.0) -> tuple[int, str]:
        self.start(argv, delay)
        return self.finish()

    def kill_during(
        self,
        argv: list[str],
        delay: float,
        phase: str,
        occurrence: int,
        window: float,
        rng: random.Random,
    ) -> tuple[int, str, str]:
        """Run `argv`, SIGKILL it a random part of `window` after its `occurrence`-th `phase`
        (none: after its start) and return its exit code, stderr and a line naming the kill."""
        self.start(argv, delay)
        if phase:
            assert self.wait_for(phase, occurrence), f"{phase} #{occurrence} never came"
        time.sleep(rng.uniform(0, window))
        self.kill()
        code, err = self.finish()
        return code, err, f"kill after {phase or 'start'} #{occurrence}, exit {code}"

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    base = make_base(SHAPES, seed=5)
    (tmp / "base").mkdir()
    save_file(base, str(tmp / "base" / "model.safetensors"))
    checkpoints = []
    for i in (1, 2, 3):
        path = tmp / f"ckpt-{i}"
        path.mkdir()
        save_file(apply(base, make_task_vector(base, seed=10 + i)), str(path / "model.safetensors"))
        checkpoints.append(path)
    pristine = tmp / "pristine"
    state = MergeState.create(pristine, tmp / "base")
    state.add(checkpoints[0])
    server = ForkServer(tmp)
    # The add under test, once without interruption: its duration and its result.
    reference = tmp / "reference"
    shutil.copytree(pristine, reference)
    code, err = server.run(["add", str(reference), str(checkpoints[1]), "--quiet"], DELAY)
    assert code == 0, err
    duration = server.phases[-1][0] - server.started
    phases = [p for _, p in server.phases]
    assert phases[:2] == ["start:hashing", "finish"] and "start:step" in phases, phases
    yield {
        "tmp": tmp,
        "pristine": pristine,
        "checkpoints": checkpoints,
        "server": server,
        "duration": duration,
        "phases": phases,
        "before": state.state_dict(),
        "after": MergeState.open(reference).state_dict(),
    }
    server.close()


def file_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def kill_targets(world) -> list[tuple[str, int, float]]:
    """(phase, occurrence, longest extra wait) for each kill: every phase of the add several
    times, then uniformly random instants of the whole add ("" = from the start)."""
    fsyncs = world["phases"].count("fsync")
    assert fsyncs >= 5  # state file, generation dir, state dir, manifest, state dir after rename
    targets = [("start:hashing", 1, 0.12)] * 4 + [("start:step", 1, 0.2)] * 8
    targets += [("fsync", k, 1.5 * DELAY) for k in range(1, fsyncs + 1) for _ in range(2)]
    targets += [("replace", 1, 1.5 * DELAY)] * 3 + [("rmtree", 1, 1.5 * DELAY)] * 2
    targets += [("", 1, world["duration"])] * 10
    return targets


def test_kill_at_any_instant_of_an_add(world):
    server: ForkServer = world["server"]
    tmp, pristine = world["tmp"], world["pristine"]
    checkpoint = str(world["checkpoints"][1])
    pristine_files = file_digests(pristine)
    rng = random.Random(1234)
    killed, landed = 0, {"before commit": 0, "after commit": 0}
    for trial, (phase, occurrence, window) in enumerate(kill_targets(world)):
        state_dir = tmp / f"trial-{trial}"
        shutil.copytree(pristine, state_dir)
        argv = ["add", str(state_dir), checkpoint, "--quiet"]
        code, err, kill = server.kill_during(argv, DELAY, phase, occurrence, window, rng)
        context = f"trial {trial}: {kill}"
        if code == -signal.SIGKILL:
            killed += 1
        else:
            assert code == 0, f"{context}: {err}"

        # The state opens and holds the weights of before the add, or of after it.
        state = MergeState.open(state_dir)
        assert state.step in (1, 2), context
        committed = state.step == 2
        landed["after commit" if committed else "before commit"] += 1
        expected = world["after"] if committed else world["before"]
        assert same_weights(state.state_dict(), expected), context
        if not committed:  # the previous state is untouched, not merely equivalent
            now = file_digests(state_dir)
            for name in ("manifest.json", *[n for n in pristine_files if n.startswith("gen-")]):
                assert now[name] == pristine_files[name], f"{context}: {name} changed"
        exported = state.export(tmp / f"export-{trial}")
        assert same_weights(load_file(str(exported / "model.safetensors")), expected), context

        # The same add again: completes the step, or says it was already merged.
        code, err = server.run(["add", str(state_dir), checkpoint, "--quiet"])
        if committed:
            assert code == 2 and "already merged at step 2" in err, f"{context}: {err}"
        else:
            assert code == 0, f"{context}: {err}"
            leftovers = sorted(p.name for p in state_dir.iterdir())
            assert leftovers == ["gen-000002", "lock", "manifest.json"], f"{context}: {leftovers}"
        final = MergeState.open(state_dir)
        assert final.step == 2 and same_weights(final.state_dict(), world["after"]), context
        shutil.rmtree(state_dir)
        shutil.rmtree(tmp / f"export-{trial}")
    assert killed >= 30, f"only {killed} adds were killed mid-way"
    assert landed["before commit"] >= 20 and landed["after commit"] >= 2, landed


def test_a_second_add_is_locked_out(world):
    server: ForkServer = world["server"]
    tmp = world["tmp"]
    state_dir = tmp / "locked"
    shutil.copytree(world["pristine"], state_dir)
    before = file_digests(state_dir)
    # A slow first add holds the lock for a long time; it is killed once the checks are done.
    server.start(["add", str(state_dir), str(world["checkpoints"][1]), "--quiet"], delay=0.5)
    assert server.wait_for("start:hashing")
    second = subprocess.run(
        [sys.executable, "-m", "mergestream", "add", str(state_dir), str(world["checkpoints"][2])],
        env=dict(os.environ, PYTHONPATH=SRC),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 2, second.stderr
    assert "another mergestream process is using this state" in second.stderr
    assert "Traceback" not in second.stderr
    with pytest.raises(StateError, match="another mergestream process is adding to this state"):
        MergeState.open(state_dir).export(tmp / "locked-export")
    assert not server.done, "the first add should still hold the lock"
    server.kill()
    assert server.finish()[0] == -signal.SIGKILL
    assert file_digests(state_dir)["manifest.json"] == before["manifest.json"]
    # The kill released the lock: the second add now goes through.
    code, err = server.run(["add", str(state_dir), str(world["checkpoints"][2]), "--quiet"])
    assert code == 0, err
    assert MergeState.open(state_dir).step == 2
