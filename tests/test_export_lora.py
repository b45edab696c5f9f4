"""`export --as-lora`: the merge as a PEFT adapter, checked by loading it with PEFT.

The reference is computed here, independently: the truncated SVD of each linear weight's merged
task vector (from `MergeState.task_vectors()`), and base + τ for tensors saved whole. PEFT loads
the adapter onto a float64 base and `merge_and_unload()` gives the weights compared with it. With
float64 factors the only differences are float64 round-off (≤1e-12 relative); with the default
float32 factors, float32 rounding of A and B (≤1e-6 relative).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_helpers import FAMILIES, Zoo, load_adapter_model, state_dict_of

from mergestream.classify import default_is_linear_weight
from mergestream.cli import main
from mergestream.errors import MergestreamError
from mergestream.export_lora import export_lora, truncated_factors
from mergestream.state import MergeState


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.name)
def merged(request, tmp_path_factory) -> tuple[Zoo, Path]:
    """An OPCM state holding two adapters and a full fine-tune of one family."""
    root = tmp_path_factory.mktemp(f"export_{request.param.name}")
    zoo = Zoo(request.param, root)
    state = MergeState.create(root / "state", zoo.base, "opcm")
    for item in (zoo.adapters[0], zoo.full, zoo.adapters[1]):
        state.add(item)
    return zoo, root / "state"


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).norm() / reference.norm())


def _truncated(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def _loaded_weights(zoo: Zoo, out: Path) -> dict[str, torch.Tensor]:
    model = load_adapter_model(zoo.family, zoo.base, out).merge_and_unload()
    return {k: v.to(torch.float64) for k, v in model.state_dict().items()}


def _check_export(zoo: Zoo, state_dir: Path, out: Path, tolerance: float) -> None:
    state = MergeState.open(state_dir)
    report_modules = {m["module"]: m for m in _card_modules(out)}
    config = json.loads((out / "adapter_config.json").read_text())
    fan_in_fan_out = config["fan_in_fan_out"]
    weights = _loaded_weights(zoo, out)
    base = state_dict_of(zoo.base)
    for name, tau in state.task_vectors():
        module = name.rpartition(".")[0]
        got = weights[name] - base[name]
        if name in report_modules_weights(report_modules):
            matrix = tau.t() if fan_in_fan_out else tau
            rank = report_modules[module]["rank"]
            expected = _truncated(matrix, rank)
            expected = expected.t() if fan_in_fan_out else expected
            retained = float(expected.norm() / tau.norm())
            assert report_modules[module]["retained"] == pytest.approx(retained, abs=1e-6)
        else:
            expected = tau  # saved whole (modules_to_save) or carried by lora_B's bias
        if expected.norm() == 0:
            assert torch.equal(got, expected), name
        else:
            assert _relative_error(got, expected) <= tolerance, name


def report_modules_weights(modules: dict[str, dict]) -> set[str]:
    return {m + ".weight" for m in modules}


def _card_modules(out: Path) -> list[dict]:
    """The per-module table of the model card: module, rank, retained fraction."""
    rows = []
    for line in (out / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[1].isdigit():
            rows.append({"module": cells[0], "rank": int(cells[1]), "retained": float(cells[2])})
    return rows


def test_exported_adapter_loads_and_is_the_truncated_svd(merged, tmp_path) -> None:
    zoo, state_dir = merged
    out = tmp_path / "adapter"
    report = export_lora(MergeState.open(state_dir), out, rank=2, dtype=torch.float64)
    assert report.modules and all(m.rank == 2 for m in report.modules)
    # The full fine-tune changed norms and embeddings too: they are saved whole, not dropped.
    assert report.modules_to_save and not report.dropped
    _check_export(zoo, state_dir, out, tolerance=1e-12)


def test_default_float32_factors(merged, tmp_path) -> None:
    zoo, state_dir = merged
    out = tmp_path / "adapter"
    export_lora(MergeState.open(state_dir), out, rank=3)
    _check_export(zoo, state_dir, out, tolerance=1e-6)


def test_energy_target_picks_the_smallest_rank_per_module(merged, tmp_path) -> None:
    zoo, state_dir = merged
    out = tmp_path / "adapter"
    state = MergeState.open(state_dir)
    report = export_lora(state, out, energy=0.8, dtype=torch.float64)
    taus = dict(state.task_vectors())
    for m in report.modules:
        s = torch.linalg.svdvals(taus[m.module + ".weight"])
        kept = torch.cumsum(s.square(), 0) / s.square().sum()
        assert kept[m.rank - 1] >= 0.8 - 1e-12
        assert m.rank == 1 or kept[m.rank - 2] < 0.8
    assert len({m.rank for m in report.modules}) > 1  # ranks differ: rank_pattern is exercised
    _check_export(zoo, state_dir, out, tolerance=1e-12)


def test_drop_other_lists_what_it_leaves_out(merged, tmp_path) -> None:
    zoo, state_dir = merged
    out = tmp_path / "adapter"
    state = MergeState.open(state_dir)
    report = export_lora(state, out, rank=2, drop_other=True, dtype=torch.float64)
    lora_modules = {m.module for m in report.modules}
    expected_dropped = sorted(
        name
        for name, tau in state.task_vectors()
        if bool(tau.any())
        and not (len(tau.shape) == 2 and default_is_linear_weight(name))
        and name.rpartition(".")[0] not in lora_modules
    )
    assert report.dropped == expected_dropped and expected_dropped
    assert not report.modules_to_save
    card = (out / "README.md").read_text()
    assert all(name in card for name in expected_dropped)
    weights = _loaded_weights(zoo, out)
    base = state_dict_of(zoo.base)
    for name in expected_dropped:
        assert torch.equal(weights[name], base[name].to(torch.float64)), name


def test_truncated_factors_are_balanced_and_exact_at_full_rank() -> None:
    torch.manual_seed(0)
    tau = torch.randn(7, 5, dtype=torch.float64)
    full = truncated_factors(tau, rank=10)
    assert full.rank == 5 and full.retained == pytest.approx(1.0, abs=1e-15)
    assert _relative_error(full.b @ full.a, tau) <= 1e-14
    two = truncated_factors(tau, rank=2)
    assert torch.allclose(two.b.norm(dim=0), two.a.norm(dim=1), rtol=1e-12)
    assert _relative_error(two.b @ two.a, _truncated(tau, 2)) <= 1e-14


def test_cli_export_as_lora(merged, tmp_path, capsys) -> None:
    zoo, state_dir = merged
    out = tmp_path / "adapter"
    assert main(["export", str(state_dir), str(out), "--as-lora", "2"]) == 0
    assert "wrote a LoRA adapter" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "| module | rank | ‖τ‖ retained |" in card
    _check_export(zoo, state_dir, out, tolerance=1e-6)
    # OUT now holds files: a second export refuses it and leaves it as it was.
    before = (out / "adapter_model.safetensors").read_bytes()
    assert main(["export", str(state_dir), str(out), "--as-lora", "1"]) == 2
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_refuses_a_merge_that_changed_nothing(merged, tmp_path) -> None:
    zoo, _ = merged
    state = MergeState.create(tmp_path / "state", zoo.base, "opcm")
    with pytest.raises(MergestreamError, match="equals the base"):
        export_lora(state, tmp_path / "out", rank=2)
    assert not (tmp_path / "out").exists()
