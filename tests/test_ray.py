"""Merge steps on a real local Ray cluster: the same bits as the local engine, faults, memory.

A module-wide cluster (`ray.init` with 2 CPUs) serves most tests; one test starts its own with
`ray start --head` in a temporary directory and reaches it by address. Checkpoints are float64:
float32 inputs would hide a reduction order that depends on scheduling.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergestream import MergeState
from mergestream.errors import ConfigError, MergestreamError, StateError
from mergestream.methods import get_method
from mergestream.step import engine
from mergestream.step.tasks import (
    PAUSE_DIR_ENV,
    TASKS_PER_SLOT,
    SerialExecutor,
    plan_tasks,
    tensor_cost,
)
from mergestream.synthetic import llama_shapes, write_stream

ray = pytest.importorskip("ray")
from mergestream.step.ray_backend import RayBackend  # noqa: E402 - needs ray

METHODS = {
    "opcm": {},
    "ties": {"threshold": 30.0},
    "magmax": {},
    "average": {},
    "task_arithmetic": {},
    "iso_c": {},
    "tsv_m": {},
    "dop": {"num_steps": 20},  # the reference's Adam loop, shortened: the same code either way
}
SHAPES = llama_shapes(layers=2, hidden=32, intermediate=64, kv=16, vocab=128)


@pytest.fixture(scope="module")
def cluster():
    # ray.init installs its own SIGTERM/SIGINT handlers in this process and shutdown leaves
    # them: put back what was there, so later tests see the process's usual handlers.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.fixture
def streamed_rows(monkeypatch):
    """Small streaming thresholds, so the tiny model's larger tensors go by row blocks (the
    driver hands its values to every task)."""
    monkeypatch.setattr(engine, "STREAM_MIN_ELEMENTS", 2048)
    monkeypatch.setattr(engine, "ROW_BLOCK_ELEMENTS", 640)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models")
    return write_stream(directory, 3, shapes=SHAPES, dtype=torch.float64)


def exported(state: MergeState, out: Path) -> dict[str, torch.Tensor]:
    state.export(out)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def local_run(tmp_path: Path, base: Path, paths: list[Path], method: str) -> MergeState:
    state = MergeState.create(tmp_path / f"local-{method}", base, method, **METHODS[method])
    for path in paths:
        state.add(path)
    return state


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_the_local_engines_bits(
    cluster, streamed_rows, models, tmp_path, method
):
    base, paths = models
    local = local_run(tmp_path, base, paths, method)
    remote = MergeState.create(tmp_path / f"ray-{method}", base, method, **METHODS[method])
    for path in paths:
        remote.add(path, backend="ray")
    assert remote.scalars == local.scalars
    assert_same_bits(exported(local, tmp_path / "a"), exported(remote, tmp_path / "b"))
    # The merged weights moved away from the base: the comparison is not between two bases.
    base_weights = load_file(base / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(exported(remote, tmp_path / "c")[name], base_weights[name])
    # Several part files per state kind, every one recorded and intact.
    manifest_parts = remote.status(verify=True)
    assert manifest_parts["health"]["ok"], manifest_parts["health"]
    generation = next((tmp_path / f"ray-{method}").glob("gen-*"))
    assert len(list(generation.iterdir())) > 1


@pytest.mark.parametrize("method", ["magmax", "opcm"])
def test_large_streamed_tensor_matches_with_any_task_size(cluster, monkeypatch, tmp_path, method):
    """A row-streamed tensor large enough that MKL splits its reductions over threads: the
    local step uses every core for it, a 1-CPU task must still give the same bits."""
    monkeypatch.setattr(engine, "STREAM_MIN_ELEMENTS", 1 << 19)
    monkeypatch.setattr(engine, "ROW_BLOCK_ELEMENTS", 1 << 18)
    shapes = llama_shapes(layers=1, hidden=64, intermediate=128, kv=32, vocab=1 << 14)
    base, paths = write_stream(tmp_path / "models", 2, shapes=shapes, dtype=torch.float64)
    local = local_run(tmp_path, base, paths, method)
    remote = MergeState.create(tmp_path / "remote", base, method)
    for path in paths:
        remote.add(path, backend=RayBackend(cpus_per_task=1))
    assert remote.scalars == local.scalars
    assert_same_bits(dict(local.task_vectors()), dict(remote.task_vectors()))


def test_local_and_ray_steps_alternate(cluster, streamed_rows, models, tmp_path):
    base, paths = models
    local = local_run(tmp_path, base, paths, "opcm")
    mixed = MergeState.create(tmp_path / "mixed", base, "opcm")
    for i, path in enumerate(paths):
        mixed.add(path, backend="ray" if i % 2 == 0 else None)
    reopened = MergeState.open(tmp_path / "mixed")
    assert reopened.scalars == local.scalars
    assert_same_bits(exported(local, tmp_path / "a"), exported(reopened, tmp_path / "b"))


def test_name_mapping_reaches_the_tasks(cluster, models, tmp_path):
    base, paths = models
    prefixed = tmp_path / "prefixed"
    prefixed.mkdir()
    tensors = load_file(paths[0] / "model.safetensors")
    save_file({f"wrapper.{k}": v for k, v in tensors.items()}, prefixed / "model.safetensors")
    local = MergeState.create(tmp_path / "local", base, "opcm")
    local.add(paths[0])
    remote = MergeState.create(tmp_path / "remote", base, "opcm")
    remote.add(prefixed, backend="ray", strip_prefix="wrapper.")
    assert_same_bits(dict(local.task_vectors()), dict(remote.task_vectors()))
    assert remote.ledger[0]["mapping"]["strip_prefix"] == "wrapper."


def test_in_memory_states_and_checkpoints_are_refused(models, tmp_path):
    base, paths = models
    in_memory = MergeState.in_memory(base, "opcm")
    with pytest.raises(ConfigError, match="needs a state on disk"):
        in_memory.add(paths[0], backend="ray")
    on_disk = MergeState.create(tmp_path / "state", base, "opcm")
    with pytest.raises(ConfigError, match="checkpoint as a path"):
        on_disk.add(load_file(paths[0] / "model.safetensors"), backend="ray")
    assert on_disk.step == 0
    with pytest.raises(MergestreamError, match="unknown backend"):
        on_disk.add(paths[0], backend="spark")


def test_command_line_backend_ray(cluster, models, tmp_path, capsys):
    from mergestream.cli import main

    base, paths = models
    local = local_run(tmp_path, base, paths, "opcm")
    state = tmp_path / "cli-state"
    assert main(["init", str(state), "--base", str(base), "--quiet"]) == 0
    assert main(["add", str(state), *map(str, paths), "--backend", "ray", "--quiet"]) == 0
    assert_same_bits(dict(local.task_vectors()), dict(MergeState.open(state).task_vectors()))
    assert main(["add", str(state), str(paths[0]), "--ray-address", "auto"]) == 2
    assert "need --backend ray" in capsys.readouterr().err


def test_without_a_backend_ray_is_never_imported(models, tmp_path):
    base, paths = models
    script = (
        "import sys\n"
        "from mergestream.cli import main\n"
        "assert main(['init', sys.argv[1], '--base', sys.argv[2], '--quiet']) == 0\n"
        "assert main(['add', sys.argv[1], sys.argv[3], '--quiet']) == 0\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "state"), str(base), str(paths[0])],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize("method", ["opcm", "ties"])
def test_lora_adapters_through_tasks_give_the_local_engines_bits(tmp_path, method):
    """An adapter step run by an executor's tasks (each binds the adapter to the base and forms
    its task vectors from the factors) writes the local engine's bits: factored sums for OPCM,
    dense ones for TIES (whose whole-model top-k runs in the driver)."""
    pytest.importorskip("peft")
    from lora_helpers import LLAMA, make_adapter, save_base
    from peft import LoraConfig

    base = save_base(LLAMA, tmp_path / "base")
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False
    )
    adapters = [
        make_adapter(LLAMA, base, tmp_path / f"adapter{i}", config, seed=i) for i in (1, 2)
    ]
    states = {}
    for backend in ("local", "tasks"):
        state = MergeState.create(tmp_path / backend, base, method)
        for adapter in adapters:
            state.add(adapter, backend=SerialExecutor() if backend == "tasks" else None)
        states[backend] = state
    local, remote = states["local"], states["tasks"]
    assert remote.step == 2 and remote.scalars == local.scalars
    forms = {i.name: local.state_form(i.name).kind for i in local.infos}
    assert forms == {i.name: remote.state_form(i.name).kind for i in remote.infos}
    assert ("factored" in forms.values()) == (method == "opcm")
    assert_same_bits(exported(local, tmp_path / "a"), exported(remote, tmp_path / "b"))


@pytest.mark.parametrize("method", ["opcm", "tsv_m"])
def test_a_factored_state_gives_the_local_engines_bits(cluster, streamed_rows, tmp_path, method):
    """A state that keeps an adapter's matrices as factors (the adapter's step run by Ray's
    tasks as well), then a checkpoint of layer 0 only:
    its tensors turn dense (their factored sums formed in the tasks), layer 1's stay factored
    (folded by `update_factored` with an unchanged task vector) or zero. Ray's tasks write the
    local engine's bits."""
    pytest.importorskip("peft")
    from lora_helpers import LLAMA, make_adapter, save_base, state_dict_of
    from peft import LoraConfig

    from mergestream.store.storage import DiskStorage

    base = save_base(LLAMA, tmp_path / "base")
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
    )
    adapter = make_adapter(LLAMA, base, tmp_path / "adapter", config, seed=1)
    weights = state_dict_of(base)
    layer0 = {k: v + 0.01 * torch.randn_like(v) for k, v in weights.items() if ".layers.0." in k}
    (tmp_path / "partial").mkdir()
    save_file(layer0, str(tmp_path / "partial" / "model.safetensors"))
    states = {}
    for backend in ("local", "ray"):
        state = MergeState.create(tmp_path / backend, base, method)
        state.add(adapter, backend=backend)  # the adapter too: bound to the base in the tasks
        state.add(tmp_path / "partial", missing="base", backend=backend)
        states[backend] = state
    local, remote = states["local"], states["ray"]
    forms = {i.name: local.state_form(i.name) for i in local.infos}
    assert forms == {i.name: remote.state_form(i.name) for i in remote.infos}
    kinds = {(".layers.0." in n, f.kind) for n, f in forms.items()}
    assert (False, "factored") in kinds and (True, "factored") not in kinds
    assert remote.scalars == local.scalars
    for name, form in forms.items():
        if form.kind == "factored":
            a, b = local.state_factors(name), remote.state_factors(name)
            for x, y in zip((a.u, a.sigma, a.v), (b.u, b.sigma, b.v), strict=True):
                assert torch.equal(x, y), name
        elif form.kind == "dense":
            (x,) = local.state_tensors(name).values()
            (y,) = remote.state_tensors(name).values()
            assert torch.equal(x, y), name
    assert remote.status(verify=True)["health"]["ok"]
    parts = DiskStorage(tmp_path / "ray").load_manifest()["parts"]
    assert sum(p.get("form") == "factored" for p in parts) >= 1
    assert_same_bits(exported(local, tmp_path / "a"), exported(remote, tmp_path / "b"))


def test_plan_puts_costly_tensors_first_and_alone():
    from mergestream.methods import TensorInfo

    method = get_method("opcm")
    rule = method.config.linear_rule()
    shapes = llama_shapes(layers=4, hidden=256, intermediate=688, kv=64, vocab=1000)
    infos = []
    for name, shape in shapes.items():
        spec = type("Spec", (), {"shape": shape, "dtype": torch.float32})()
        infos.append(TensorInfo(name, shape, torch.float32, rule.is_linear(name, spec)))
    costs = {i.name: tensor_cost(i) for i in infos}
    for slots in (1, 4, 16):
        tasks = plan_tasks(infos, method, slots=slots)
        names = [n for t in tasks for n in t.names]
        assert sorted(names) == sorted(shapes)  # every tensor exactly once
        assert [t.cost for t in tasks] == sorted((t.cost for t in tasks), reverse=True)
        assert [t.cost for t in tasks] == [sum(costs[n] for n in t.names) for t in tasks]
        share = sum(costs.values()) / (slots * TASKS_PER_SLOT)
        for task in tasks:
            if len(task.names) > 1:  # grouped: only tensors cheaper than a share each
                assert all(costs[n] < share for n in task.names)
                assert task.cost < 2 * share
    assert len(plan_tasks(infos, method, slots=16)) > len(plan_tasks(infos, method, slots=1))
    # With many slots the costliest tensor (the output head, a projected 1000 x 256) goes first.
    assert plan_tasks(infos, method, slots=16)[0].names == ("lm_head.weight",)
    assert max(costs, key=costs.__getitem__) == "lm_head.weight"


def _wait_for(directory: Path, count: int, timeout: float = 60) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        markers = [p for p in directory.iterdir() if p.name != "go"]
        if len(markers) >= count:
            return markers
        time.sleep(0.05)
    raise AssertionError(f"no task reached the pause point in {timeout} s")


def _add_in_thread(state: MergeState, path: Path, backend: RayBackend) -> dict:
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["stats"] = state.add(path, backend=backend)
        except BaseException as err:  # noqa: BLE001 - reported to the test
            outcome["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    outcome["thread"] = thread
    return outcome


def test_killed_worker_is_retried_or_fails_cleanly(cluster, models, tmp_path):
    base, paths = models
    local = local_run(tmp_path, base, paths[:2], "opcm")
    state = MergeState.create(tmp_path / "state", base, "opcm")
    state.add(paths[0], backend="ray")
    before = (tmp_path / "state" / "manifest.json").read_text()

    def paused_backend(pause: Path, retries: int) -> RayBackend:
        pause.mkdir()
        env = {"env_vars": {PAUSE_DIR_ENV: str(pause)}}
        return RayBackend(max_retries=retries, task_options={"runtime_env": env})

    # Without retries: the step fails with a clear error and the state stays at step 1.
    pause = tmp_path / "pause-1"
    outcome = _add_in_thread(state, paths[1], paused_backend(pause, 0))
    victim = _wait_for(pause, 1)[0]
    os.kill(int(victim.suffix[1:]), signal.SIGKILL)
    (pause / "go").touch()
    outcome["thread"].join(120)
    assert isinstance(outcome.get("error"), MergestreamError), outcome
    assert "failed" in str(outcome["error"])
    assert (tmp_path / "state" / "manifest.json").read_text() == before
    assert sorted(p.name for p in (tmp_path / "state").glob("gen-*")) == ["gen-000001"]
    assert MergeState.open(tmp_path / "state").status(verify=True)["health"]["ok"]

    # With retries: the killed task runs again and the step gives the uninterrupted bits.
    pause = tmp_path / "pause-2"
    outcome = _add_in_thread(state, paths[1], paused_backend(pause, 2))
    victim = _wait_for(pause, 1)[0]
    os.kill(int(victim.suffix[1:]), signal.SIGKILL)
    (pause / "go").touch()
    outcome["thread"].join(120)
    assert "stats" in outcome, outcome.get("error")
    markers = [p for p in pause.iterdir() if p.name.startswith(victim.name.split(".")[0] + ".")]
    assert len(markers) >= 2  # the killed task's part ran again, in another process
    assert state.step == 2
    assert state.status(verify=True)["health"]["ok"]
    assert_same_bits(dict(local.task_vectors()), dict(state.task_vectors()))


def test_serial_executor_gives_the_same_bits(models, tmp_path):
    """The distributed plumbing (plan, part files, reduction) without a cluster."""
    base, paths = models
    local = local_run(tmp_path, base, paths, "magmax")
    serial = MergeState.create(tmp_path / "serial", base, "magmax")
    for path in paths:
        serial.add(path, backend=SerialExecutor())
    assert serial.scalars == local.scalars
    assert_same_bits(dict(local.task_vectors()), dict(serial.task_vectors()))


def test_a_node_seeing_other_files_is_refused(models, tmp_path):
    """A task whose machine sees another checkpoint at the same path refuses to merge it."""
    base, paths = models
    copy = tmp_path / "ckpt"
    shutil.copytree(paths[0], copy)

    class OtherFilesExecutor(SerialExecutor):
        def run(self, job, tasks):  # noqa: ANN001, ANN202
            tensors = load_file(copy / "model.safetensors")
            tensors["extra.weight"] = torch.zeros(2)  # other content, other header
            save_file(tensors, copy / "model.safetensors")
            yield from super().run(job, tasks)

    state = MergeState.create(tmp_path / "state", base, "opcm")
    with pytest.raises(StateError, match="differs from the one the driver planned"):
        state.add(copy, backend=OtherFilesExecutor())
    assert state.step == 0
    assert not list((tmp_path / "state").glob("gen-*"))


def _rss_sampler() -> tuple[threading.Event, list[int]]:
    page = os.sysconf("SC_PAGE_SIZE")
    stop = threading.Event()
    samples: list[int] = []

    def sample() -> None:
        while not stop.is_set():
            with open("/proc/self/statm") as f:
                samples.append(int(f.read().split()[1]) * page)
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    return stop, samples


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_driver_memory_does_not_grow_with_the_model(cluster, tmp_path):
    """Peak RSS of the driver during a Ray step, tiny model vs one with 8x the entries. A
    driver holding one whole float64 model would grow by the big model's size; this one
    hashes the checkpoint in fixed chunks and holds no tensor."""
    tiny = llama_shapes(layers=2, hidden=128, intermediate=256, kv=64, vocab=2048)
    big = llama_shapes(layers=4, hidden=256, intermediate=512, kv=128, vocab=8192)
    numel = {
        k: sum(torch.Size(s).numel() for s in v.values()) for k, v in (("t", tiny), ("b", big))
    }
    assert 7.5 <= numel["b"] / numel["t"] <= 8.5
    page = os.sysconf("SC_PAGE_SIZE")
    deltas = {}
    for label, shapes in (("t", tiny), ("b", big)):
        base, paths = write_stream(tmp_path / label, 2, shapes=shapes, dtype=torch.float64)
        state = MergeState.create(tmp_path / f"state-{label}", base, "opcm")
        if label == "t":  # warm-up: the first Ray step of a process sets up its connections
            state.add(paths[1], backend="ray")
        with open("/proc/self/statm") as f:
            before = int(f.read().split()[1]) * page
        stop, samples = _rss_sampler()
        state.add(paths[0], backend="ray")
        stop.set()
        deltas[label] = max(samples, default=before) - before
    big_bytes = numel["b"] * 8
    print(
        f"driver peak RSS growth: tiny {deltas['t'] / 2**20:.1f} MiB, 8x model "
        f"{deltas['b'] / 2**20:.1f} MiB (the 8x model is {big_bytes / 2**20:.1f} MiB)"
    )
    assert deltas["b"] - deltas["t"] < big_bytes / 2, (deltas, big_bytes)
    assert deltas["b"] < big_bytes / 2, (deltas, big_bytes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_pids(temp: Path, port: int) -> set[int]:
    """Processes of the cluster started in `temp` on `port` and all their descendants."""
    parents: dict[int, int] = {}
    roots: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if str(temp) in cmdline or f":{port} " in cmdline + " ":
            roots.add(int(proc.name))
    found = set(roots)
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    found.discard(os.getpid())
    return found


def _stop_cluster(temp: Path, port: int) -> None:
    """Stop only the cluster this test started (never `ray stop`, which stops every cluster
    of the user): SIGTERM to its processes, then SIGKILL to those still there."""
    pids = _cluster_pids(temp, port)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
            Path(f"/proc/{p}/cmdline").exists() and Path(f"/proc/{p}/cmdline").read_bytes()
            for p in pids
        ):
            time.sleep(0.2)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the cluster's processes in /proc")
def test_a_cluster_started_with_ray_start(models, tmp_path):
    """`ray start --head` in a temporary directory, reached by address from a fresh process.

    Ray 2.60 starts such a cluster with token authentication (`RAY_AUTH_MODE=token`): the
    cluster and the client get one random token through the environment, so nothing is read
    from or written to ~/.ray. The head listens on the machine's own address whatever
    --node-ip-address says, so the client uses the address `ray start` prints."""
    if ray.is_initialized():
        ray.shutdown()  # the module's cluster is not needed any more (this test runs last)
    ray_exe = Path(sys.executable).with_name("ray")
    if not ray_exe.exists():
        pytest.skip("the ray command is not installed beside python")
    temp = Path("/tmp") / f"msray-{os.getpid()}"  # Ray's socket paths must stay short
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex()}
    start = [
        str(ray_exe), "start", "--head", f"--port={port}", f"--temp-dir={temp}",
        "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
    ]  # fmt: skip
    try:
        started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stderr[-3000:]
        printed = re.search(r"--address='([^']+)'", started.stdout + started.stderr)
        address = printed.group(1) if printed else f"127.0.0.1:{port}"
        base, paths = models
        local = local_run(tmp_path, base, paths[:2], "ties")
        script = (
            "import sys\n"
            "from mergestream import MergeState\n"
            "from mergestream.step.ray_backend import RayBackend\n"
            "state = MergeState.create(sys.argv[1], sys.argv[2], 'ties', threshold=30.0)\n"
            "for path in sys.argv[4:]:\n"
            "    state.add(path, backend=RayBackend(address=sys.argv[3]))\n"
        )
        run = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "remote"), str(base), address,
             *map(str, paths[:2])],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        remote = MergeState.open(tmp_path / "remote")
        assert remote.step == 2
        assert_same_bits(dict(local.task_vectors()), dict(remote.task_vectors()))
    finally:
        _stop_cluster(temp, port)
        shutil.rmtree(temp, ignore_errors=True)
