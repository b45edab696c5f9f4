"""Kernels on a CUDA GPU give the CPU's merge: every method, in memory and on disk, whole and by
row blocks, the tall-skinny-QR route included. Skipped where torch sees no GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import memory_stream

from mergestream import MergeState, merge
from mergestream.cli import main as cli_main
from mergestream.methods.base import TensorInfo
from mergestream.methods.opcm import fold_projected_rows, opcm_project
from mergestream.step import engine

# The device under test. Everything below is written against this name so that the same checks
# can be pointed at another device.
DEVICE = "cuda"

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

METHODS = [
    ("opcm", {}),
    ("opcm", {"zero_diagonal": False, "alpha": 0.3}),
    ("opcm", {"decomposition": "svd"}),
    ("opcm", {"state_dtype": "float32"}),
    ("task_arithmetic", {"scaling_factor": 0.3}),
    ("ties", {"scaling_factor": 0.3, "threshold": 20}),
    ("average", {}),
    ("magmax", {}),
]

# float32 state rounds differently on the two devices; everything else is float64 throughout.
TOLERANCE = {"float32": 1e-5}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _assert_same_task_vectors(got: dict, expected: dict, base: dict, tolerance: float) -> None:
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].device.type == "cpu", name  # results come back to the host
        if not tensor.is_floating_point():
            assert torch.equal(got[name], tensor), name
            continue
        reference = base[name].double()
        assert _relative(got[name] - reference, tensor - reference) <= tolerance, name


@pytest.mark.parametrize(("method", "params"), METHODS)
def test_in_memory_merge_on_gpu_equals_cpu(method, params) -> None:
    base, models = memory_stream(4, seed=21)
    on_cpu = merge(base, models, method, dtype=torch.float64, **params)
    on_gpu = merge(base, models, method, dtype=torch.float64, device=DEVICE, **params)
    tolerance = TOLERANCE.get(params.get("state_dtype", ""), 1e-9)
    _assert_same_task_vectors(on_gpu, on_cpu, base, tolerance)


@pytest.mark.parametrize(("method", "params"), [METHODS[0], METHODS[5], METHODS[7]])
def test_streamed_merge_on_gpu_equals_whole_merge_on_cpu(monkeypatch, method, params) -> None:
    base, models = memory_stream(4, seed=22)
    on_cpu = merge(base, models, method, dtype=torch.float64, **params)
    # Stream every tensor of 200 entries or more in blocks of about 50 (3 rows of 16).
    monkeypatch.setattr(engine, "STREAM_MIN_ELEMENTS", 200)
    monkeypatch.setattr(engine, "ROW_BLOCK_ELEMENTS", 50)
    streamed_rows: list[str] = []
    load_rows = engine.load_task_rows

    def spy(info, base_source, checkpoint, start, stop, device):  # noqa: ANN001, ANN202
        assert torch.device(device).type == torch.device(DEVICE).type
        streamed_rows.append(info.name)
        return load_rows(info, base_source, checkpoint, start, stop, device)

    monkeypatch.setattr(engine, "load_task_rows", spy)
    on_gpu = merge(base, models, method, dtype=torch.float64, device=DEVICE, **params)
    assert streamed_rows, "nothing was streamed"
    _assert_same_task_vectors(on_gpu, on_cpu, base, 1e-9)


def test_tall_skinny_qr_route_on_gpu_matches_svd_projection() -> None:
    # κ(S) = 1e7: the rows fold must leave the Gram route for a tall-skinny QR, on the GPU.
    g = torch.Generator().manual_seed(12)
    m, n = 60, 12
    q1, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = q1 @ torch.diag(torch.logspace(0, -7, n, dtype=torch.float64)) @ q2.T
    tau = torch.randn(m, n, generator=g, dtype=torch.float64) * 0.1
    s_dev, tau_dev = s.to(DEVICE), tau.to(DEVICE)

    class Rows:
        info = TensorInfo("w", (m, n), torch.float32, projected=True)
        blocks = [(i, min(i + 7, m)) for i in range(0, m, 7)]
        written: dict[int, torch.Tensor] = {}

        def task_rows(self, start: int, stop: int) -> torch.Tensor:
            return tau_dev[start:stop].clone()

        def state_rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
            return {"sum": s_dev[start:stop].clone()}

        def write_rows(self, start: int, state) -> None:  # noqa: ANN001
            assert state["sum"].device.type == torch.device(DEVICE).type
            self.written[start] = state["sum"].cpu()

    rows = Rows()
    partials = fold_projected_rows(rows, 0.5, True, "gram", lambda t: t)
    new_sum = torch.cat([rows.written[a] for a, _ in rows.blocks])
    expected = opcm_project(s, tau, 0.5, True, "svd")
    assert _relative(new_sum - s, expected) <= 1e-8
    assert float(partials["task_norm_sq"]) == pytest.approx(float(tau.square().sum()), rel=1e-12)


def test_disk_state_and_cli_on_gpu(tiny_stream, tmp_path) -> None:
    base_dir, models = tiny_stream
    on_cpu = MergeState.create(tmp_path / "cpu", base_dir, "opcm")
    for model in models[:3]:
        on_cpu.add(model)

    on_gpu = MergeState.create(tmp_path / "gpu", base_dir, "opcm")
    on_gpu.add(models[0], device=DEVICE)
    on_gpu.add(models[1], device=DEVICE)
    cli_args = ["add", str(tmp_path / "gpu"), str(models[2]), "--device", DEVICE, "--quiet"]
    assert cli_main(cli_args) == 0
    on_gpu = MergeState.open(tmp_path / "gpu")

    assert on_gpu.step == 3
    for key, value in on_cpu.scalars.items():
        assert on_gpu.scalars[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    expected = dict(on_cpu.task_vectors())
    for name, tv in on_gpu.task_vectors():
        assert _relative(tv, expected[name]) <= 1e-9, name


def test_gpu_streams_give_the_same_state_as_one_stream(tiny_stream, tmp_path) -> None:
    # Several workers run tensors on streams of their own; the state must not depend on it.
    base_dir, models = tiny_stream
    states = {}
    for workers in (1, 4):
        state = MergeState.create(tmp_path / f"w{workers}", base_dir, "opcm")
        for model in models[:3]:
            state.add(model, device=DEVICE, workers=workers)
        states[workers] = state
    for key, value in states[1].scalars.items():
        assert states[4].scalars[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    expected = dict(states[1].task_vectors())
    for name, tv in states[4].task_vectors():
        assert _relative(tv, expected[name]) <= 1e-12, name


def test_first_decomposition_of_a_process_may_come_from_gpu_workers(tiny_stream, tmp_path) -> None:
    # torch loads its CUDA linear algebra lazily; worker threads making the first call together
    # used to fail ("lazy wrapper should be called at most once"). A fresh process, so that no
    # earlier test has loaded it already.
    base_dir, models = tiny_stream
    script = (
        "import sys; from mergestream import MergeState\n"
        "state = MergeState.create(sys.argv[1], sys.argv[2], 'opcm')\n"
        "for model in sys.argv[3:]:\n"
        f"    state.add(model, device={DEVICE!r}, workers=4)\n"
    )
    args = [str(tmp_path / "state"), str(base_dir), *map(str, models[:2])]
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert MergeState.open(tmp_path / "state").step == 2
