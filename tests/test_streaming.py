"""Large tensors folded by row blocks: the same merge as holding them whole, for every method,
on disk and in memory; the row-range readers and writers underneath; errors that still name
the tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TINY_SHAPES, memory_stream
from safetensors.torch import load_file, save_file

from mergestream import CheckpointError, MergeState, merge
from mergestream.io.open import open_checkpoint
from mergestream.io.safetensors_stream import (
    SafetensorsFile,
    StreamingSafetensorsWriter,
    TensorSpec,
)
from mergestream.methods.base import TensorInfo
from mergestream.methods.linalg import r_factor, right_singular, right_singular_from_r
from mergestream.methods.opcm import fold_projected_rows, opcm_project
from mergestream.step import engine
from mergestream.store.generation import GenerationReader

# With these limits the tiny models stream their embedding table (30x16), the tall MLP weight
# (24x16) and the square attention weights (16x16) in blocks of 3 rows; biases, norms and the
# wide MLP weight (16x24, which OPCM holds whole) take the whole-tensor path.
SMALL_STREAM = 200
SMALL_BLOCK = 50

METHODS = [
    ("opcm", {}),
    ("opcm", {"zero_diagonal": False, "alpha": 0.3}),
    ("opcm", {"decomposition": "svd"}),
    ("opcm", {"decomposition": "approx-gram"}),
    ("opcm", {"state_dtype": "float32"}),
    ("task_arithmetic", {"scaling_factor": 0.3}),
    ("ties", {"scaling_factor": 0.3, "threshold": 20}),
    ("ties", {"scope": "tensor"}),
    ("average", {}),
    ("magmax", {}),
]


def _stream_small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "STREAM_MIN_ELEMENTS", SMALL_STREAM)
    monkeypatch.setattr(engine, "ROW_BLOCK_ELEMENTS", SMALL_BLOCK)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _streamed_names(method: str, params: dict) -> set[str]:
    """The tensors the engine streams under SMALL_STREAM for this method (an independent
    statement of the rule, so the test notices when the engine streams something else)."""
    names = set()
    for name, shape in TINY_SHAPES.items():
        numel = 1
        for d in shape:
            numel *= d
        if numel < SMALL_STREAM:
            continue
        if method == "ties" and params.get("scope") == "tensor":
            continue
        linear = "LayerNorm" not in name and "embeddings" not in name
        if method == "opcm" and linear and shape[0] < shape[1]:
            continue  # a wide linear weight: OPCM holds it whole
        names.add(name)
    return names


@pytest.mark.parametrize(("method", "params"), METHODS)
def test_streamed_merge_equals_whole_tensor_merge(monkeypatch, method, params) -> None:
    base, models = memory_stream(4, seed=5)
    whole = merge(base, models, method, dtype=torch.float64, **params)

    _stream_small(monkeypatch)
    expected_streamed = _streamed_names(method, params)
    seen_rows: set[str] = set()
    load_rows = engine.load_task_rows
    load_whole = engine.load_task_vector

    def spy_rows(info, *args, **kwargs):  # noqa: ANN001, ANN202
        seen_rows.add(info.name)
        return load_rows(info, *args, **kwargs)

    def spy_whole(info, *args, **kwargs):  # noqa: ANN001, ANN202
        assert info.name not in expected_streamed, f"{info.name} was read whole"
        return load_whole(info, *args, **kwargs)

    monkeypatch.setattr(engine, "load_task_rows", spy_rows)
    monkeypatch.setattr(engine, "load_task_vector", spy_whole)
    streamed = merge(base, models, method, dtype=torch.float64, **params)

    assert seen_rows == expected_streamed
    assert set(streamed) == set(whole)
    for name, tensor in whole.items():
        if not tensor.is_floating_point():
            assert torch.equal(streamed[name], tensor)
            continue
        delta_whole = tensor - base[name].double()
        delta_streamed = streamed[name] - base[name].double()
        assert _relative(delta_streamed, delta_whole) <= 1e-9, name


@pytest.mark.parametrize("method", ["opcm", "ties", "magmax"])
def test_streamed_disk_state_equals_whole_and_resumes(
    monkeypatch, tiny_stream, tmp_path, method
) -> None:
    base_dir, models = tiny_stream
    whole = MergeState.create(tmp_path / "whole", base_dir, method)
    for model in models[:4]:
        whole.add(model)

    _stream_small(monkeypatch)
    state = MergeState.create(tmp_path / "streamed", base_dir, method)
    for model in models[:2]:
        state.add(model)
    state = MergeState.open(tmp_path / "streamed")  # a new process would reopen it
    for model in models[2:4]:
        state.add(model)

    assert state.scalars.keys() == whole.scalars.keys()
    for key, value in whole.scalars.items():
        assert state.scalars[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    got, expected = dict(state.task_vectors()), dict(whole.task_vectors())
    for name, tv in expected.items():
        assert _relative(got[name], tv) <= 1e-9, name


def test_projected_rows_fold_matches_projection_for_an_ill_conditioned_sum() -> None:
    # κ(S) = 1e7 > GRAM_MAX_CONDITION: the rows fold must take the tall-skinny-QR route.
    g = torch.Generator().manual_seed(11)
    m, n = 60, 12
    q1, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    sigma = torch.logspace(0, -7, n, dtype=torch.float64)
    s = q1 @ torch.diag(sigma) @ q2.T
    tau = torch.randn(m, n, generator=g, dtype=torch.float64) * 0.1

    class Rows:
        info = TensorInfo("w", (m, n), torch.float32, projected=True)
        blocks = [(i, min(i + 7, m)) for i in range(0, m, 7)]
        written: dict[int, torch.Tensor] = {}
        state_reads = 0

        def task_rows(self, start: int, stop: int) -> torch.Tensor:
            return tau[start:stop].clone()

        def state_rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
            Rows.state_reads += 1
            return {"sum": s[start:stop].clone()}

        def write_rows(self, start: int, state) -> None:  # noqa: ANN001
            self.written[start] = state["sum"]

    rows = Rows()
    partials = fold_projected_rows(rows, 0.5, True, "gram", lambda t: t)
    new_sum = torch.cat([rows.written[a] for a, _ in rows.blocks])
    expected_tau = opcm_project(s, tau, 0.5, True, "svd")
    assert _relative(new_sum - s, expected_tau) <= 1e-8
    assert Rows.state_reads == 3 * len(rows.blocks)  # Gram pass, QR pass, update pass
    assert partials["task_norm_sq"] == pytest.approx(float(tau.square().sum()), rel=1e-12)
    assert partials["sum_norm_sq"] == pytest.approx(float(new_sum.square().sum()), rel=1e-12)
    removed = tau - expected_tau
    assert partials["removed_norm_sq"] == pytest.approx(float(removed.square().sum()), rel=1e-6)


def test_tall_skinny_qr_gives_the_singular_values_of_the_stacked_blocks() -> None:
    g = torch.Generator().manual_seed(2)
    s = torch.randn(50, 9, generator=g, dtype=torch.float64)
    s[:, 3] = s[:, 0] * 1e-9  # nearly dependent column: κ about 1e10
    blocks = [s[i : i + 4] for i in range(0, 50, 4)]  # the first block has fewer rows than n
    r = r_factor(blocks, 9)
    assert r.shape == (9, 9)
    expected = right_singular(s, "svd")
    got = right_singular_from_r(r, 50)
    assert torch.allclose(got.sigma, expected.sigma, rtol=1e-9, atol=1e-12 * float(s.norm()))
    assert got.rank == expected.rank


def test_streamed_tensor_with_nan_names_file_tensor_rows_and_leaves_state(
    monkeypatch, tiny_stream, tmp_path
) -> None:
    base_dir, models = tiny_stream
    state = MergeState.create(tmp_path / "state", base_dir, "opcm")
    state.add(models[0])
    before = _files(tmp_path / "state")
    bad = load_file(str(models[1] / "model.safetensors"))
    name = "encoder.layer.1.intermediate.dense.weight"
    bad[name][17, 5] = float("nan")
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    save_file(bad, str(bad_dir / "model.safetensors"))

    _stream_small(monkeypatch)
    with pytest.raises(CheckpointError) as caught:
        state.add(bad_dir)
    message = str(caught.value)
    assert str(bad_dir / "model.safetensors") in message
    assert repr(name) in message
    assert "rows 15:18" in message  # blocks of 3 rows of 16
    assert f"first at flat index {17 * 16 + 5}" in message
    assert _files(tmp_path / "state") == before
    assert MergeState.open(tmp_path / "state").step == 1


def test_row_reads_match_slices_for_every_format(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(9, 4, generator=g).to(torch.bfloat16),
        "b": torch.randn(7, generator=g, dtype=torch.float64),
        "c": torch.randn(5, 2, 3, generator=g),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    torch.save(tensors, tmp_path / "model.bin")
    for path in (tmp_path / "model.safetensors", tmp_path / "model.bin"):
        source = open_checkpoint(path)
        try:
            for name, tensor in tensors.items():
                for start, stop in [(0, 0), (0, 1), (2, 5), (3, tensor.shape[0])]:
                    got = source.get_rows(name, start, stop)
                    assert got.dtype == tensor.dtype
                    assert torch.equal(got, tensor[start:stop]), (path.name, name, start)
        finally:
            source.close()
    with SafetensorsFile(tmp_path / "model.safetensors") as handle, pytest.raises(ValueError):
        handle.read_rows("a", 3, 10)


def test_row_writes_complete_a_tensor_only_when_every_row_is_written(tmp_path) -> None:
    spec = TensorSpec(torch.float32, (5, 3))
    full = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    path = tmp_path / "rows.safetensors"
    writer = StreamingSafetensorsWriter(path, [("x", spec)])
    writer.write_rows("x", 3, full[3:5])
    writer.write_rows("x", 0, full[0:3])
    writer.close()
    assert torch.equal(load_file(str(path))["x"], full)

    partial = StreamingSafetensorsWriter(tmp_path / "partial.safetensors", [("x", spec)])
    partial.write_rows("x", 0, full[0:3])
    with pytest.raises(RuntimeError, match="never written"):
        partial.close()
    bad = StreamingSafetensorsWriter(tmp_path / "bad.safetensors", [("x", spec)])
    with pytest.raises(ValueError, match="rows 4:6"):
        bad.write_rows("x", 4, full[0:2])
    bad.abort()


def test_block_layout_covers_every_row_once(monkeypatch) -> None:
    monkeypatch.setattr(engine, "ROW_BLOCK_ELEMENTS", 100)
    assert engine.row_blocks((10, 30)) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert engine.row_blocks((7, 1000)) == [(i, i + 1) for i in range(7)]  # one row at least
    assert engine.row_blocks((250,)) == [(0, 100), (100, 200), (200, 250)]


def test_stream_limit_is_inclusive() -> None:
    limit = engine.STREAM_MIN_ELEMENTS
    assert engine.is_streamed(TensorInfo("e", (limit // 1024, 1024), torch.bfloat16, False))
    assert not engine.is_streamed(TensorInfo("e", (limit - 1,), torch.bfloat16, False))


@pytest.mark.parametrize("method", ["opcm", "task_arithmetic", "average"])
def test_streamed_export_writes_the_same_weights(
    monkeypatch, tiny_stream, tmp_path, method
) -> None:
    base_dir, models = tiny_stream
    state = MergeState.create(tmp_path / "state", base_dir, method)
    for model in models[:3]:
        state.add(model)
    state.export(tmp_path / "whole")
    _stream_small(monkeypatch)
    read_whole = GenerationReader.task_vector

    def refuse_streamed(self, info):  # noqa: ANN001, ANN202
        assert not engine.is_streamed(info), f"{info.name} was computed whole"
        return read_whole(self, info)

    monkeypatch.setattr(GenerationReader, "task_vector", refuse_streamed)
    MergeState.open(tmp_path / "state").export(tmp_path / "streamed", max_shard_size="8KB")
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    streamed = {}
    for shard in sorted((tmp_path / "streamed").glob("model-*.safetensors")):
        streamed.update(load_file(str(shard)))
    assert streamed.keys() == whole.keys()
    for name, tensor in whole.items():
        assert torch.equal(streamed[name], tensor), name
