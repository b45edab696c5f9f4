"""`mergestream watch` under a careful user's hands: OUT belongs to one state and names what each
version was made from; `--then` processes end with the watcher; an unreadable journal is shown by
`status` and rebuilt; `--once` exits 3 when it refused a checkpoint; `add`'s fitting options;
`--export-lora`. Tiny models; the watcher runs in-process through the CLI where no signal or
process tree is involved, as a real process where one is."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_SHAPES
from safetensors.torch import load_file, save_file

from mergestream import MergeState
from mergestream.cli import build_parser
from mergestream.cli import main as cli_main
from mergestream.publish.export_lora import export_lora
from mergestream.synthetic import write_stream

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
QUERY = "encoder.layer.0.attention.self.query"


def zoo(tmp_path: Path, models: int = 3) -> tuple[Path, list[Path]]:
    (tmp_path / "inbox").mkdir()
    return write_stream(tmp_path / "zoo", models=models, seed=7, shapes=TINY_SHAPES)


def run_watch(state: Path, inbox: Path, *flags: str) -> int:
    """`mergestream watch STATE INBOX --once --settle 0 FLAGS...` in this process."""
    return cli_main(["watch", str(state), str(inbox), "--once", "--settle", "0", *map(str, flags)])


def step_of(state: Path) -> int:
    return json.loads((state / "manifest.json").read_text())["step"]


def versions(out: Path) -> list[str]:
    return sorted(p.name for p in out.with_name(out.name + ".versions").glob("step-*"))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ------------------------------------------------------------------- OUT belongs to one state


def test_another_state_is_refused_an_out_it_did_not_publish(tmp_path, capsys):
    """Two states (opcm, task_arithmetic) on one base and inbox: the second may not publish into
    the first one's OUT, nor count the first one's version as its own."""
    base, models = zoo(tmp_path, 2)
    inbox = tmp_path / "inbox"
    for i, model in enumerate(models):
        shutil.copytree(model, inbox / f"m{i}")
    p, q, out = tmp_path / "P", tmp_path / "Q", tmp_path / "out"
    MergeState.create(p, base, method="opcm")
    MergeState.create(q, base, method="task_arithmetic")
    assert run_watch(p, inbox, "--export", out) == 0
    published = out.resolve()
    p_model = weights(out)
    capsys.readouterr()
    assert run_watch(q, inbox, "--export", out) == 2
    err = capsys.readouterr().err
    assert f"{out}: publishes the merge of the state {p}, not of this state" in err
    assert "choose another" in err and "Traceback" not in err
    assert step_of(q) == 0  # refused before merging anything
    assert out.resolve() == published
    assert all(torch.equal(t, p_model[n]) for n, t in weights(out).items())


def test_a_state_created_again_at_the_same_path_is_another_state(tmp_path, capsys):
    base, models = zoo(tmp_path, 2)
    inbox = tmp_path / "inbox"
    for i, model in enumerate(models):
        shutil.copytree(model, inbox / f"m{i}")
    p, out = tmp_path / "P", tmp_path / "out"
    MergeState.create(p, base, method="opcm")
    assert run_watch(p, inbox, "--export", out) == 0
    before = (out.resolve(), versions(out))
    shutil.rmtree(p)
    MergeState.create(p, base, method="opcm", alpha=0.9)
    capsys.readouterr()
    assert run_watch(p, inbox, "--export", out) == 2
    err = capsys.readouterr().err
    assert f"{out}: publishes the merge of an earlier state at {p}" in err
    assert (out.resolve(), versions(out)) == before
    # Removing OUT and its versions hands the path to the new state.
    out.unlink()
    shutil.rmtree(tmp_path / "out.versions")
    assert run_watch(p, inbox, "--export", out) == 0
    assert MergeState.open(p).ledger[-1]["step"] == 2
    assert versions(out)[-1] == out.resolve().name and len(versions(out)) == 2


def test_keep_never_prunes_another_states_versions_or_unlisted_folders(tmp_path, capsys):
    base, models = zoo(tmp_path, 3)
    w1, w5 = tmp_path / "W1", tmp_path / "W5"
    (tmp_path / "inbox5").mkdir()
    shutil.copytree(models[0], tmp_path / "inbox" / "m0")
    shutil.copytree(models[1], tmp_path / "inbox5" / "m1")
    MergeState.create(w1, base)
    MergeState.create(w5, base)
    merged = w1.parent / "W1-merged"
    assert run_watch(w1, tmp_path / "inbox", "--export", merged) == 0
    mine = versions(merged)
    capsys.readouterr()
    assert run_watch(w5, tmp_path / "inbox5", "--export", merged, "--keep", "1") == 2
    assert "publishes the merge of the state" in capsys.readouterr().err
    assert versions(merged) == mine and merged.resolve().name == mine[0]
    # A folder that looks like a version but that this state did not write is never pruned.
    stranger = merged.with_name("W1-merged.versions") / "step-000001-00000000000000ab"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    shutil.copytree(models[2], tmp_path / "inbox" / "m2")
    assert run_watch(w1, tmp_path / "inbox", "--export", merged, "--keep", "1") == 0
    assert (stranger / "notes.txt").read_text() == "mine"
    assert [v for v in versions(merged) if v != stranger.name] == [merged.resolve().name]
    assert merged.resolve().name.startswith("step-000002-")


def test_a_state_made_before_states_had_an_id_keeps_one_across_steps(tmp_path):
    base, models = zoo(tmp_path, 2)
    state, inbox, out = tmp_path / "state", tmp_path / "inbox", tmp_path / "out"
    MergeState.create(state, base)
    manifest = json.loads((state / "manifest.json").read_text())
    for key in ("id", "checksum"):  # as an older mergestream wrote it
        manifest.pop(key, None)
    (state / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(models[0], inbox / "m0")
    assert run_watch(state, inbox, "--export", out) == 0
    owner = json.loads((tmp_path / "out.versions" / "owner.json").read_text())["state"]["id"]
    assert owner.startswith("derived-")
    shutil.copytree(models[1], inbox / "m1")
    assert run_watch(state, inbox, "--export", out) == 0  # the same state after its next write
    assert step_of(state) == 2 and len(versions(out)) == 2


def test_versions_without_an_owner_record_are_refused(tmp_path, capsys):
    base, models = zoo(tmp_path, 1)
    state = tmp_path / "state"
    MergeState.create(state, base)
    shutil.copytree(models[0], tmp_path / "inbox" / "m0")
    old = tmp_path / "out.versions" / "step-000001-0123456789ab"  # as an older watcher named it
    old.mkdir(parents=True)
    assert run_watch(state, tmp_path / "inbox", "--export", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "step-000001-0123456789ab" in err and "no owner.json ties to a state" in err
    assert old.is_dir() and step_of(state) == 0


def test_an_out_versions_that_cannot_be_used_is_one_line_not_a_traceback(tmp_path, capsys):
    base, _ = zoo(tmp_path, 1)
    state = tmp_path / "state"
    MergeState.create(state, base)
    (tmp_path / "out.versions").write_text("a file where the versions folder goes")
    assert run_watch(state, tmp_path / "inbox", "--export", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "out.versions: cannot record which state publishes there" in err
    assert len(err.strip().splitlines()) == 1


def test_a_version_names_the_export_settings_too(tmp_path):
    """The same step exported in another dtype is another version: a restart with --dtype
    publishes it instead of taking the old export for it."""
    base, models = zoo(tmp_path, 1)
    state, out = tmp_path / "state", tmp_path / "out"
    MergeState.create(state, base)
    shutil.copytree(models[0], tmp_path / "inbox" / "m0")
    assert run_watch(state, tmp_path / "inbox", "--export", out) == 0
    first = out.resolve()
    assert weights(out)[f"{QUERY}.weight"].dtype == torch.float32
    assert run_watch(state, tmp_path / "inbox", "--export", out, "--dtype", "float16") == 0
    assert out.resolve() != first
    assert weights(out)[f"{QUERY}.weight"].dtype == torch.float16
    again = out.resolve()
    assert run_watch(state, tmp_path / "inbox", "--export", out, "--dtype", "float16") == 0
    assert out.resolve() == again and len(versions(out)) == 2  # already published: reused
    # What a run killed mid-write leaves under a hidden name (a file too) goes on the next run.
    leftover = tmp_path / "out.versions" / ".owner.json.4242.tmp"
    leftover.write_text("{")
    assert run_watch(state, tmp_path / "inbox", "--export", out, "--dtype", "float16") == 0
    assert not leftover.exists()


# ------------------------------------------------------------------- --then and its processes


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[2] == str(pgid) and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[1] == str(pid) and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_then_processes_end_when_the_watcher_is_stopped(tmp_path, sig):
    base, models = zoo(tmp_path, 1)
    state = tmp_path / "state"
    MergeState.create(state, base)
    shell_pid = tmp_path / "shell.pid"
    hook = f"echo $$ > {shell_pid}; sleep 53; echo done"
    watcher = subprocess.Popen(
        [sys.executable, "-m", "mergestream", "watch", str(state), str(tmp_path / "inbox"),
         "--settle", "0", "--poll", "0.1", "--then", hook],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    sleepers: list[int] = []
    try:
        shutil.copytree(models[0], tmp_path / "inbox" / "m0")
        _wait_for(lambda: shell_pid.is_file() and shell_pid.read_text().strip(), what="the hook")
        shell = int(shell_pid.read_text())
        _wait_for(lambda: _children(shell), what="the hook's sleep")
        sleepers = _children(shell)
        watcher.send_signal(sig)
        _, err = watcher.communicate(timeout=30)
        assert watcher.returncode == 0, err
        _wait_for(lambda: not any(map(_alive, [shell, *sleepers])), 10, "the hook to end")
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
        for pid in sleepers:  # the test's own leftovers, if the watcher failed to end them
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc")
def test_what_a_hook_leaves_running_ends_when_a_once_run_ends(tmp_path):
    base, models = zoo(tmp_path, 1)
    state = tmp_path / "state"
    MergeState.create(state, base)
    shutil.copytree(models[0], tmp_path / "inbox" / "m0")
    background = tmp_path / "background.pid"
    hook = f"sleep 57 & echo $! > {background}"
    result = subprocess.run(
        [sys.executable, "-m", "mergestream", "watch", str(state), str(tmp_path / "inbox"),
         "--once", "--settle", "0", "--then", hook],
        capture_output=True, text=True, env=ENV, timeout=120,
    )  # fmt: skip
    pid = int(background.read_text())
    try:
        assert result.returncode == 0, result.stderr
        _wait_for(lambda: not _alive(pid), 10, "the background sleep to end")
        assert not _group_members(pid)
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------ an unreadable journal


def test_an_unreadable_journal_shows_in_status_and_is_rebuilt(tmp_path, capsys):
    base, models = zoo(tmp_path, 1)
    state, inbox = tmp_path / "state", tmp_path / "inbox"
    MergeState.create(state, base)
    shutil.copytree(models[0], inbox / "good")
    (inbox / "garbage.safetensors").write_bytes(os.urandom(3000))
    assert run_watch(state, inbox) == 3
    before = json.loads((state / "watch.json").read_text())["checkpoints"]
    (state / "watch.json").write_text('{"format": "mergestream-watch", "checkpoints": {"a": ')
    capsys.readouterr()
    assert cli_main(["status", str(state)]) == 1
    shown = capsys.readouterr().out
    assert "health:  ok" not in shown and "health:  DAMAGED (1 problems)" in shown
    assert f"{state / 'watch.json'}: unreadable watch journal" in shown
    assert "rebuilds it from the ledger and the inbox" in shown
    assert cli_main(["status", str(state), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["health"]["ok"] is False
    # The watcher moves it aside, says so in one line, and rebuilds it.
    assert run_watch(state, inbox, "--log-json") == 3  # the garbage is refused again
    log = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    rebuilt = [e for e in log if e["event"] == "journal-rebuilt"]
    assert len(rebuilt) == 1 and "moved it to watch.json.corrupt-" in rebuilt[0]["message"]
    assert Path(rebuilt[0]["moved_to"]).read_text().endswith('"a": ')
    assert step_of(state) == 1  # nothing merged twice
    after = json.loads((state / "watch.json").read_text())["checkpoints"]
    assert {k: v["outcome"] for k, v in after.items()} == {
        k: v["outcome"] for k, v in before.items()
    }
    assert cli_main(["status", str(state)]) == 0
    assert "health:  ok" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text",
    ['{"format": "mergestream-watch", "checkpoints": []}', "[]", '{"format": "other"}'],
    ids=["checkpoints-list", "a-list", "another-format"],
)
def test_a_journal_of_the_wrong_shape_counts_as_unreadable(tmp_path, capsys, text):
    base, models = zoo(tmp_path, 1)
    state, inbox = tmp_path / "state", tmp_path / "inbox"
    MergeState.create(state, base)
    shutil.copytree(models[0], inbox / "good")
    (state / "watch.json").write_text(text)
    assert cli_main(["status", str(state)]) == 1
    assert run_watch(state, inbox) == 0
    assert step_of(state) == 1
    assert len(list(state.glob("watch.json.corrupt-*"))) == 1


# ----------------------------------------------------------------------------- exit status 3


def test_once_exits_3_when_it_refused_a_checkpoint(tmp_path, capsys):
    base, models = zoo(tmp_path, 2)
    state, inbox = tmp_path / "state", tmp_path / "inbox"
    MergeState.create(state, base)
    (inbox / "bad.safetensors").write_bytes(os.urandom(3000))
    assert run_watch(state, inbox) == 3  # every checkpoint refused
    assert run_watch(state, inbox) == 0  # left alone: nothing refused by this run
    shutil.copytree(models[0], inbox / "good")
    (inbox / "bad.safetensors").write_bytes(os.urandom(3001))  # changed: tried again
    assert run_watch(state, inbox) == 3  # one merged, one refused
    assert step_of(state) == 1
    shutil.copytree(models[1], inbox / "fine")
    assert run_watch(state, inbox) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["watch", "--help"])
    assert "3 when a --once run refused a checkpoint" in " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------------- add's fitting options


def _flags_of_watch() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a.choices, dict))  # noqa: SLF001
    return {s for a in sub.choices["watch"]._actions for s in a.option_strings}  # noqa: SLF001


def _refusals(state: Path) -> dict[str, str]:
    entries = json.loads((state / "watch.json").read_text())["checkpoints"]
    return {k: v["reason"] for k, v in entries.items() if v["outcome"] == "refused"}


def _assert_only_watch_flags(reason: str) -> None:
    suggested = set(re.findall(r"--[a-z][a-z-]+", reason))
    assert suggested and suggested <= _flags_of_watch(), reason


def test_watch_takes_adds_fitting_options_from_flags_and_config(tmp_path, capsys):
    base, models = zoo(tmp_path, 2)
    state, inbox = tmp_path / "state", tmp_path / "inbox"
    MergeState.create(state, base)
    tensors = load_file(str(models[0] / "model.safetensors"))
    renamed = {"model." + n: t for n, t in tensors.items()}
    save_file(renamed, str(inbox / "prefixed.safetensors"))
    assert run_watch(state, inbox) == 3
    reason = _refusals(state)["prefixed.safetensors"]
    assert "--strip-prefix model." in reason
    _assert_only_watch_flags(reason)
    # Other fitting options: the refusal is tried again, and merged.
    assert run_watch(state, inbox, "--strip-prefix", "model.") == 0
    ledger = MergeState.open(state).ledger
    assert ledger[-1]["mapping"]["strip_prefix"] == "model."
    # From a config file: a checkpoint without one tensor and with one the base lacks.
    partial = load_file(str(models[1] / "model.safetensors"))
    del partial[f"{QUERY}.bias"]
    partial["classifier.weight"] = torch.ones(2, 16)
    save_file(partial, str(inbox / "partial.safetensors"))
    assert run_watch(state, inbox) == 3
    reason = _refusals(state)["partial.safetensors"]
    _assert_only_watch_flags(reason)
    config = tmp_path / "watch.yaml"
    config.write_text(
        f"state: {state}\ninbox: {inbox}\nonce: true\nsettle: 0\nmissing: base\nextra: ignore\n"
    )
    assert cli_main(["watch", "--config", str(config)]) == 0
    ledger = MergeState.open(state).ledger
    assert ledger[-1]["mapping"]["missing"] == "base" and ledger[-1]["mapping"]["extra"] == "ignore"
    config.write_text(f"state: {state}\ninbox: {inbox}\nmissing: some\n")
    capsys.readouterr()
    assert cli_main(["watch", "--config", str(config)]) == 2
    assert "missing must be one of error, base, got 'some'" in capsys.readouterr().err


def _adapter(folder: Path, base_name: str) -> Path:
    """A hand-made rank-2 PEFT LoRA adapter on one linear layer, trained on `base_name`."""
    folder.mkdir()
    generator = torch.Generator().manual_seed(3)
    save_file(
        {
            f"base_model.model.{QUERY}.lora_A.weight": torch.randn(2, 16, generator=generator),
            f"base_model.model.{QUERY}.lora_B.weight": torch.randn(16, 2, generator=generator),
        },
        str(folder / "adapter_model.safetensors"),
    )
    config = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["query"],
        "base_model_name_or_path": base_name,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_force_base_merges_an_adapter_named_for_another_base(tmp_path):
    base, _ = zoo(tmp_path, 1)
    state, inbox = tmp_path / "state", tmp_path / "inbox"
    MergeState.create(state, base)
    _adapter(inbox / "adapter", "someone/other-model")
    assert run_watch(state, inbox) == 3
    reason = _refusals(state)["adapter"]
    assert "--force-base" in reason
    _assert_only_watch_flags(reason)
    assert run_watch(state, inbox, "--force-base") == 0
    assert MergeState.open(state).ledger[-1]["adapter"]["ranks"] == [2]


def test_allow_zero_merges_the_base_dropped_into_the_inbox(tmp_path):
    base, _ = zoo(tmp_path, 1)
    state, inbox = tmp_path / "state", tmp_path / "inbox"
    MergeState.create(state, base)
    shutil.copytree(base, inbox / "the-base")
    assert run_watch(state, inbox) == 3
    reason = _refusals(state)["the-base"]
    assert "--allow-zero" in reason
    _assert_only_watch_flags(reason)
    assert step_of(state) == 0
    assert run_watch(state, inbox, "--allow-zero") == 0
    assert step_of(state) == 1


# --------------------------------------------------------------------------- --export-lora


def test_export_lora_publishes_an_adapter_after_each_step(tmp_path, capsys):
    base, models = zoo(tmp_path, 2)
    state, inbox, out = tmp_path / "state", tmp_path / "inbox", tmp_path / "adapter-out"
    MergeState.create(state, base)
    shutil.copytree(models[0], inbox / "m0")
    assert run_watch(state, inbox, "--export", out, "--export-lora", "3") == 0
    assert not (out / "model.safetensors").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["peft_type"] == "LORA"
    reference = tmp_path / "reference"
    export_lora(MergeState.open(state), reference, rank=3)
    got = load_file(str(out / "adapter_model.safetensors"))
    expected = load_file(str(reference / "adapter_model.safetensors"))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    first = out.resolve()
    shutil.copytree(models[1], inbox / "m1")
    assert run_watch(state, inbox, "--export", out, "--export-lora", "3", "--keep", "1") == 0
    assert out.resolve() != first and versions(out) == [out.resolve().name]
    assert out.resolve().name.startswith("step-000002-")
    # It needs --export: there is nowhere else to publish.
    capsys.readouterr()
    assert run_watch(state, inbox, "--export-lora", "3") == 2
    assert "give --export OUT" in capsys.readouterr().err


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
