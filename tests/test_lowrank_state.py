"""LoRA streams kept as factors end to end (`step/forms.py`): the forms a step plans, the methods'
hooks on factors, and whole states of real PEFT adapters against dense-only states.

The reference for every factored state is the same stream merged into a state created with
`lowrank=False` (every tensor dense, the dense kernels of methods/), in float64: the task vectors
must agree to 1e-10 relative per tensor."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergestream.errors import StateError
from mergestream.methods import get_method
from mergestream.methods import lowrank as lr
from mergestream.methods.base import TensorInfo
from mergestream.methods.linalg import rank_rtol
from mergestream.state import MergeState
from mergestream.step.forms import plan_forms, previous_forms
from mergestream.store.manifest import (
    DENSE_FORM,
    FACTORED,
    ZERO_FORM,
    TensorForm,
    forms_record,
    read_forms,
)

F64 = torch.float64
TOL = 1e-10
FACTORED_METHODS = ("opcm", "task_arithmetic", "average", "iso_c", "tsv_m")
DENSE_METHODS = ("ties", "magmax", "dop")


def rel(got: torch.Tensor, expected: torch.Tensor, scale: float | None = None) -> float:
    denominator = scale if scale is not None else float(expected.norm())
    return float((got - expected).norm()) / max(denominator, 1e-300)


def method_of(name: str, **params):
    method = get_method(name, **params)
    method.state_dtype = F64  # the dense reference keeps float64, as the factors do
    return method


# ------------------------------------------------------------------------------ planning


@dataclass
class FakeInput:
    """An input described by headers alone: tensors left unchanged, given as factors of some
    rank, or (any other) given dense."""

    unchanged: set[str] = field(default_factory=set)
    ranks: dict[str, int] = field(default_factory=dict)
    description: str = "<fake>"

    def leaves_unchanged(self, name: str) -> bool:
        return name in self.unchanged

    def task_rank(self, name: str) -> int | None:
        return self.ranks.get(name)


INFOS = [
    TensorInfo("q.weight", (64, 48), F64, True),
    TensorInfo("q.bias", (64,), F64, False),
    TensorInfo("mlp.weight", (40, 64), F64, True),
    TensorInfo("norm.weight", (48,), F64, False),
]


def test_plan_forms_follows_the_rules():
    opcm = get_method("opcm")
    start = previous_forms({"generation": None, "lowrank": True}, INFOS)
    assert set(start.values()) == {ZERO_FORM}
    adapter = FakeInput(unchanged={"q.bias", "norm.weight"}, ranks={"q.weight": 4, "mlp.weight": 3})
    first = plan_forms(opcm, INFOS, start, adapter)
    assert first == {
        "q.weight": TensorForm(FACTORED, 4, 4),
        "q.bias": ZERO_FORM,
        "mlp.weight": TensorForm(FACTORED, 3, 3),
        "norm.weight": ZERO_FORM,
    }
    # the recorded rank, not the width, bounds the next step; a rank-0 factored sum is zero
    after = {
        **first,
        "q.weight": TensorForm(FACTORED, 2, 4),
        "mlp.weight": TensorForm(FACTORED, 0, 3),
    }
    second = plan_forms(
        opcm, INFOS, after, FakeInput(unchanged={"q.bias", "mlp.weight"}, ranks={"q.weight": 5})
    )
    assert second["q.weight"] == TensorForm(FACTORED, 7, 7)
    assert second["mlp.weight"] == ZERO_FORM and second["q.bias"] == ZERO_FORM
    # a full tensor (norm) turns dense; dense stays dense even when an adapter comes back
    full_norm = FakeInput(unchanged={"q.bias", "mlp.weight"}, ranks={"q.weight": 1})
    third = plan_forms(opcm, INFOS, second, full_norm)
    assert third["norm.weight"] == DENSE_FORM and third["q.weight"].kind == FACTORED
    again = plan_forms(
        opcm, INFOS, third, FakeInput(unchanged={"norm.weight"}, ranks={"q.weight": 1})
    )
    assert again["norm.weight"] == DENSE_FORM
    # a LoRA given on a dense matrix keeps it dense
    dense_q = {**third, "q.weight": DENSE_FORM}
    assert (
        plan_forms(opcm, INFOS, dense_q, FakeInput(ranks={"q.weight": 1}))["q.weight"] == DENSE_FORM
    )


def test_plan_forms_applies_the_switch_rule_to_the_bound(monkeypatch):
    opcm = get_method("opcm")
    start = previous_forms({"generation": None, "lowrank": True}, INFOS)
    monkeypatch.setattr(lr, "DENSE_RANK_FRACTION", 0.25)  # min(64, 48)/4 = 12 for q.weight
    fits = FakeInput(ranks={"q.weight": 12}, unchanged={"q.bias", "mlp.weight", "norm.weight"})
    assert plan_forms(opcm, INFOS, start, fits)["q.weight"] == TensorForm(FACTORED, 12, 12)
    grown = {"q.weight": TensorForm(FACTORED, 10, 12)}
    past = FakeInput(ranks={"q.weight": 3}, unchanged={"q.bias", "mlp.weight", "norm.weight"})
    assert plan_forms(opcm, INFOS, grown, past)["q.weight"] == DENSE_FORM  # 10 + 3 > 12
    # the width never exceeds min(m, n)
    monkeypatch.setattr(lr, "DENSE_RANK_FRACTION", 1.0)
    huge = FakeInput(ranks={"q.weight": 60}, unchanged={"q.bias", "mlp.weight", "norm.weight"})
    assert plan_forms(opcm, INFOS, start, huge)["q.weight"] == TensorForm(FACTORED, 48, 48)


@pytest.mark.parametrize("name", DENSE_METHODS)
def test_methods_without_factors_plan_dense_everywhere(name):
    method = get_method(name)
    assert not method.factored
    start = previous_forms({"generation": None, "lowrank": True}, INFOS)
    adapter = FakeInput(unchanged={"q.bias", "norm.weight"}, ranks={"q.weight": 4, "mlp.weight": 3})
    assert set(plan_forms(method, INFOS, start, adapter).values()) == {DENSE_FORM}


def test_dense_only_and_older_states_are_dense():
    adapter = FakeInput(unchanged={"q.bias", "norm.weight"}, ranks={"q.weight": 4, "mlp.weight": 3})
    for manifest in ({"generation": None, "lowrank": False}, {"generation": None}):
        start = previous_forms(manifest, INFOS)
        assert set(plan_forms(get_method("opcm"), INFOS, start, adapter).values()) == {DENSE_FORM}
    # a format-2 generation records no forms: every tensor is dense
    assert set(previous_forms({"generation": 3}, INFOS).values()) == {DENSE_FORM}


def test_forms_in_the_manifest_round_trip_and_refuse_damage():
    forms = {"a": TensorForm(FACTORED, 3, 5), "b": ZERO_FORM, "c": DENSE_FORM}
    record = forms_record(forms)
    assert record == {"a": {"form": "factored", "rank": 3, "width": 5}, "b": {"form": "zero"}}
    assert read_forms({"forms": record}) == {"a": forms["a"], "b": ZERO_FORM}
    for bad in (
        {"a": {"form": "factored", "rank": 6, "width": 5}},
        {"a": {"form": "factored", "rank": 1}},
        {"a": {"form": "sparse"}},
        {"a": "zero"},
    ):
        with pytest.raises(StateError, match="'a'.*damaged"):
            read_forms({"forms": bad}, "<test>")


# ------------------------------------------------------------------------------ methods


def low_rank(shape, rank, g, scale=1.0) -> lr.Factors:
    m, n = shape
    b = torch.randn(m, rank, generator=g, dtype=F64)
    a = torch.randn(rank, n, generator=g, dtype=F64)
    return lr.Factors.from_lora(b, a, scale)


def dense_update(method, info, step, state, tau):
    given = {method.state_names[0]: state.clone()} if state is not None else {}
    update = method.update(info, step, given, tau.clone(), {})
    return update.state[method.state_names[0]], update.partials


def check_partials(got, expected, scale):
    assert got.keys() == expected.keys()
    for key, value in got.items():
        assert math.isclose(value, expected[key], rel_tol=TOL, abs_tol=TOL * scale), key


@pytest.mark.parametrize(
    "name,params",
    [
        ("opcm", {"zero_diagonal": True}),
        ("opcm", {"zero_diagonal": False}),
        ("task_arithmetic", {}),
        ("average", {}),
        ("iso_c", {"scaling_factor": 0.8}),
        ("tsv_m", {}),
    ],
)
def test_update_factored_equals_the_dense_update(name, params):
    """An unchanged tensor (task None), a zero previous state at a later step (state None) and
    both at once (the zero form) against the dense kernel with zero tensors."""
    method = method_of(name, **params)
    assert method.factored and method.keeps_zero
    g = torch.Generator().manual_seed(7)
    shape = (18, 12)
    info = TensorInfo("w", shape, F64, True)
    zeros = torch.zeros(shape, dtype=F64)
    state = lr.thin_svd(lr.add(low_rank(shape, 3, g), low_rank(shape, 2, g)))
    tau = low_rank(shape, 2, g, 0.5)
    cases = [(3, state, None), (3, None, tau), (1, None, tau), (4, state, tau)]
    for step, s, t in cases:
        got, partials = method.update_factored(info, step, s, t, {})
        dense_state = lr.densify(s) if s is not None else (zeros if step > 1 else None)
        expected, dense_partials = dense_update(
            method, info, step, dense_state, lr.densify(t) if t is not None else zeros
        )
        assert isinstance(got, lr.ThinSVD)
        assert rel(lr.densify(got), expected) < TOL, (step, s is None, t is None)
        check_partials(partials, dense_partials, float(expected.square().sum()) + 1)
    # zero stays zero, for any shape, with the dense kernel's partial sums of zero tensors
    for zero_info in (info, TensorInfo("b", (18,), F64, False)):
        got, partials = method.update_factored(zero_info, 5, None, None, {})
        zero = torch.zeros(zero_info.shape, dtype=F64)
        expected, dense_partials = dense_update(method, zero_info, 5, zero, zero)
        assert got is None and not bool(expected.any())
        assert partials == dense_partials


@pytest.mark.parametrize("name", FACTORED_METHODS)
def test_task_vector_factored_equals_the_dense_task_vector(name):
    method = method_of(name)
    g = torch.Generator().manual_seed(8)
    info = TensorInfo("w", (14, 9), F64, True)
    state = lr.thin_svd(low_rank((14, 9), 3, g))
    scalars = {"scale": 1.7, "norm_sum": 1.0, "merged_norm": 1.0}
    got = method.task_vector_factored(info, state, scalars)
    expected = method.task_vector(info, {method.state_names[0]: lr.densify(state)}, scalars)
    assert rel(lr.densify(got), expected) < 1e-14


# ------------------------------------------------------------------------------ reading adapters


@pytest.fixture(scope="module", params=("llama", "bert"))
def zoo(request, tmp_path_factory):
    from lora_helpers import BERT, LLAMA, Zoo

    family = LLAMA if request.param == "llama" else BERT
    return Zoo(family, tmp_path_factory.mktemp(request.param))


def bound(zoo, adapter):
    from mergestream.io.lora import base_identity, open_adapter
    from mergestream.io.mapping import NameMapping
    from mergestream.io.open import open_checkpoint

    base = open_checkpoint(zoo.base)
    return open_adapter(adapter).bind(base, NameMapping(), base_identity(str(zoo.base), zoo.base))


def test_task_factors_are_the_adapters_task_vector(zoo):
    """rsLoRA, rank_pattern, an embedding LoRA (transposed), lora_B biases and modules saved
    whole: the factors' product is the task vector wherever the tensor is LoRA only."""
    kinds = set()
    for adapter in zoo.adapters:
        source = bound(zoo, adapter)
        try:
            touched = source.touched()
            for name in source.names():
                tau = source.task_vector(name, "cpu")
                factors = source.task_factors(name, "cpu")
                rank = source.task_rank(name)
                if source.leaves_unchanged(name):
                    assert name not in touched and not bool(tau.any()) and factors is None
                    continue
                if factors is None:
                    assert rank is None and ("full" in touched[name] or "bias" in touched[name])
                    kinds.add("dense")
                    continue
                left, right = factors
                assert left.dtype == right.dtype == F64 and left.shape[1] == right.shape[1] == rank
                assert rel(left @ right.mT, tau) < 1e-15, name
                kinds.add(touched[name].split(" r=")[0])
        finally:
            source.close()
    assert {"lora", "dense"} <= kinds


# ------------------------------------------------------------------------------ whole states


def assert_same_merge(factored, dense) -> None:
    """Task vectors equal to 1e-10 relative per tensor (a zero one exactly), same scalars."""
    assert factored.step == dense.step
    for (name, got), (_, expected) in zip(
        factored.task_vectors(), dense.task_vectors(), strict=True
    ):
        assert torch.isfinite(got).all(), name
        if expected.norm() == 0:
            assert not bool(got.any()), name
        else:
            assert rel(got, expected) < TOL, (name, rel(got, expected))
    for key, value in dense.scalars.items():
        assert math.isclose(factored.scalars[key], value, rel_tol=TOL, abs_tol=1e-12), key


def forms_of(state) -> dict[str, str]:
    return {info.name: state.state_form(info.name).kind for info in state.infos}


def merged_pair(tmp_path, base, stream, method, **params):
    """The same stream into a factored state and into a dense-only one (float64 both)."""
    out = []
    for lowrank in (True, False):
        state = MergeState.create(
            tmp_path / f"{method}-{lowrank}",
            base,
            method,
            state_dtype="float64",
            lowrank=lowrank,
            **params,
        )
        for item in stream:
            checkpoint, options = item if isinstance(item, tuple) else (item, {})
            state.add(checkpoint, allow_duplicate=True, **options)
        out.append(state)
    return out


@pytest.fixture(scope="module")
def stream(zoo, tmp_path_factory):
    """The zoo's adapters (mixed ranks, rsLoRA, rank_pattern, lora biases, modules saved whole),
    a third adapter of the first config with other factors, and the zoo's full checkpoint."""
    from lora_helpers import make_adapter

    root = tmp_path_factory.mktemp(f"{zoo.family.name}-stream")
    extra = make_adapter(
        zoo.family, zoo.base, root / "extra", zoo.family.lora_configs[0](), seed=33
    )
    # a full checkpoint of the first layer only: the other tensors are the base's
    full = load_file(str(zoo.full / "model.safetensors"))
    partial = root / "partial"
    partial.mkdir()
    save_file({k: v for k, v in full.items() if ".0." in k}, str(partial / "model.safetensors"))
    return {
        "base": zoo.base,
        "adapters": [*zoo.adapters, extra],
        "full": zoo.full,
        "partial": partial,
    }


VARIANTS = [
    ("opcm", {"zero_diagonal": True}),
    ("opcm", {"zero_diagonal": False}),
    ("task_arithmetic", {}),
    ("average", {}),
    ("iso_c", {}),
    ("tsv_m", {"scaling_factor": 0.9}),
]


@pytest.mark.parametrize(
    "method,params", VARIANTS, ids=lambda v: str(v) if isinstance(v, str) else ""
)
def test_adapter_stream_equals_the_dense_state(stream, tmp_path, monkeypatch, method, params):
    monkeypatch.setattr(lr, "DENSE_RANK_FRACTION", 1.0)  # no matrix switches here
    adapters = stream["adapters"]
    factored, dense = merged_pair(
        tmp_path, stream["base"], [*adapters, adapters[1]], method, **params
    )
    assert_same_merge(factored, dense)
    forms = forms_of(factored)
    assert {"factored", "zero", "dense"} <= set(forms.values())  # dense: tensors saved whole
    assert set(forms_of(dense).values()) == {"dense"}
    manifest = json.loads((tmp_path / f"{method}-True" / "manifest.json").read_text())
    for name, record in manifest["forms"].items():
        if record["form"] == "factored":  # the recorded rank is the rank of the dense state
            (expected,) = dense.state_tensors(name).values()
            assert record["rank"] == true_rank(expected) <= record["width"], name


def true_rank(x: torch.Tensor) -> int:
    sigma = torch.linalg.svdvals(x.to(F64))
    return int((sigma > rank_rtol(*x.shape) * sigma[0]).sum()) if bool(sigma.any()) else 0


def test_factor_parts_are_checksummed_and_padded(stream, tmp_path, monkeypatch):
    from safetensors import safe_open

    from mergestream.store.manifest import read_state_status

    monkeypatch.setattr(lr, "DENSE_RANK_FRACTION", 1.0)
    path = tmp_path / "s"
    state = MergeState.create(path, stream["base"], "opcm")
    for adapter in stream["adapters"][:2]:
        state.add(adapter)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 3 and manifest["lowrank"] is True
    (factor_part,) = [p for p in manifest["parts"] if p.get("form") == "factored"]
    assert factor_part["file"] == "gen-000002/factors-sum.safetensors"
    factored = {n: r for n, r in manifest["forms"].items() if r["form"] == "factored"}
    assert factored and set(factor_part["crc32"]) == {
        n + s for n in factored for s in (".u", ".sigma", ".v")
    }
    with safe_open(str(path / factor_part["file"]), "pt") as f:
        for name, record in factored.items():
            k, w = record["rank"], record["width"]
            u, sigma, v = (f.get_tensor(name + s) for s in (".u", ".sigma", ".v"))
            assert u.dtype == F64 and u.shape[1] == v.shape[1] == sigma.shape[0] == w
            assert bool((sigma[:k] > 0).all()) and not bool(sigma[k:].any())
            assert not bool(u[:, k:].any()) and not bool(v[:, k:].any())
            (dense,) = state.state_tensors(name).values()
            assert rel((u * sigma) @ v.mT, dense) < 1e-15
    assert read_state_status(path, verify=True)["health"]["ok"]
    # a flipped byte in a factor is found on read and by verify, naming the file
    data = bytearray((path / factor_part["file"]).read_bytes())
    data[-9] ^= 0x10
    (path / factor_part["file"]).write_bytes(bytes(data))
    problems = read_state_status(path, verify=True)["health"]["problems"]
    assert len(problems) == 1 and "factors-sum.safetensors" in problems[0]
    with pytest.raises(StateError, match="does not match the checksum"):
        MergeState.open(path).add(stream["adapters"][2])


# ------------------------------------------------------------------------------ exports


def test_exact_lora_export_of_a_factored_state_loads_in_peft(stream, zoo, tmp_path, monkeypatch):
    """`export --as-lora` without a rank: PeftModel loads it, and its merge_and_unload() is the
    full export; each factored module has exactly the rank the manifest records."""
    from lora_helpers import load_adapter_model

    from mergestream.cli import main
    from mergestream.publish.export_lora import export_lora

    monkeypatch.setattr(lr, "DENSE_RANK_FRACTION", 1.0)
    path = tmp_path / "s"
    state = MergeState.create(path, stream["base"], "opcm")
    for adapter in stream["adapters"]:
        state.add(adapter)
    out = tmp_path / "adapter"
    export_lora(state, out, dtype=F64)
    assert "exact: each module at its rank, no truncation" in (out / "README.md").read_text()
    # the command line's --as-lora without a rank is the same export (float32 factors)
    assert main(["export", str(path), str(tmp_path / "cli"), "--as-lora", "--quiet"]) == 0
    assert (tmp_path / "cli" / "adapter_config.json").read_text() == (
        out / "adapter_config.json"
    ).read_text()
    config = json.loads((out / "adapter_config.json").read_text())
    ranks = {
        m: config["rank_pattern"].get(m.replace(".", "\\."), config["r"])
        for m in config["target_modules"]
    }
    forms = json.loads((path / "manifest.json").read_text())["forms"]
    factored = {
        n.removesuffix(".weight"): r["rank"] for n, r in forms.items() if r["form"] == "factored"
    }
    assert factored and all(ranks[m] == k for m, k in factored.items() if m in ranks)
    merged = load_adapter_model(zoo.family, zoo.base, out).merge_and_unload()
    exported = state.state_dict()
    for name, tensor in merged.state_dict().items():
        expected = exported[name]
        if bool((tensor != expected).any()):
            assert rel(tensor.to(F64), expected) < TOL, name


def test_truncated_lora_export_from_factors_equals_the_dense_one(stream, tmp_path, monkeypatch):
    from mergestream.publish.export_lora import export_lora

    monkeypatch.setattr(lr, "DENSE_RANK_FRACTION", 1.0)
    factored, dense = merged_pair(tmp_path, stream["base"], stream["adapters"], "task_arithmetic")
    results = []
    for state, name in ((factored, "f"), (dense, "d")):
        report = export_lora(state, tmp_path / name, rank=2, dtype=torch.float64)
        results.append(({m.module: (m.rank, m.retained) for m in report.modules}, tmp_path / name))
    assert results[0][0].keys() == results[1][0].keys()
    for module, (rank, retained) in results[0][0].items():
        assert rank == results[1][0][module][0] and math.isclose(
            retained, results[1][0][module][1], rel_tol=1e-9
        )
    from safetensors.torch import load_file

    got = load_file(str(results[0][1] / "adapter_model.safetensors"))
    expected = load_file(str(results[1][1] / "adapter_model.safetensors"))
    for key in got:
        if key.endswith("lora_A.weight"):
            b_key = key.replace("lora_A", "lora_B")
            product = got[b_key] @ got[key]
            assert rel(product, expected[b_key] @ expected[key]) < 1e-9, key


def test_full_export_forms_factored_weights_by_row_blocks(stream, tmp_path, monkeypatch):
    """Exported weights of a factored state, with every matrix written by row blocks, equal
    the dense-only state's export."""
    from safetensors.torch import load_file

    from mergestream.step import engine

    monkeypatch.setattr(lr, "DENSE_RANK_FRACTION", 1.0)
    factored, dense = merged_pair(tmp_path, stream["base"], stream["adapters"], "average")
    monkeypatch.setattr(engine, "STREAM_MIN_ELEMENTS", 64)
    monkeypatch.setattr(engine, "ROW_BLOCK_ELEMENTS", 50)
    got = load_file(str(factored.export(tmp_path / "f") / "model.safetensors"))
    expected = load_file(str(dense.export(tmp_path / "d") / "model.safetensors"))
    assert got.keys() == expected.keys()
    streamed = [i.name for i in factored.infos if factored.state_form(i.name).kind == "factored"]
    assert streamed and all(engine.is_streamed(i) for i in factored.infos if i.name in streamed)
    for name, tensor in got.items():
        if not torch.equal(tensor, expected[name]):
            assert rel(tensor.to(F64), expected[name].to(F64)) < TOL, name


# ------------------------------------------------------------------------------ status, plan


def test_status_and_plan_show_forms_bytes_and_cost(stream, tmp_path, monkeypatch, capsys):
    from mergestream.cli import main

    monkeypatch.setattr(lr, "DENSE_RANK_FRACTION", 1.0)
    path = tmp_path / "s"
    state = MergeState.create(path, stream["base"], "opcm")
    first, second = stream["adapters"][:2]
    plan = state.plan(first)
    # before the first step every tensor is zero: the adapter's LoRA matrices become factored
    # at its ranks, its tensors saved whole dense, the rest stays zero
    touched = plan.adapter["touched"]
    for name, how in plan.matrices.items():
        if name not in touched:
            assert how == "zero", name
        elif "full" in touched[name] or "bias" in touched[name]:
            assert how == "zero -> dense", name
        else:
            assert how == f"zero -> factored <= {touched[name].split('r=')[1]}", name
    state.add(first)
    on_disk = sum(p.stat().st_size for p in (path / "gen-000001").iterdir())
    forms = state.tensor_forms()
    assert sum(f["bytes"] for f in forms.values()) <= on_disk  # headers aside
    assert state.status()["storage"]["bytes"] == on_disk
    # the next step's plan: the bytes of the planned forms, and a cost from the ranks
    plan = state.plan(second)
    assert plan.state_bytes == on_disk and plan.forms["factored"] > 0
    dense_plan = MergeState.create(tmp_path / "d", stream["base"], "opcm", lowrank=False)
    dense_plan.add(first)
    dense_next = dense_plan.plan(second)
    assert plan.state_generation_bytes < dense_next.state_generation_bytes
    assert 0 < plan.step_flops < dense_next.step_flops and plan.step_seconds > 0
    assert set(dense_next.matrices.values()) == {"dense"} and dense_next.forms["factored"] == 0
    capsys.readouterr()
    assert main(["status", str(path), "--tensors"]) == 0
    text = capsys.readouterr().out
    factored = [n for n, f in forms.items() if f["form"] == "factored"]
    line = next(row for row in text.splitlines() if f" {factored[0]}  " in row)
    assert f"factored (rank {forms[factored[0]]['rank']})," in line
    assert "tensors as factors (rank <=" in text
    assert main(["plan", str(path), str(second)]) == 0
    text = capsys.readouterr().out
    assert "forms:    after the step" in text and "compute:  about" in text
    ties = MergeState.create(tmp_path / "t", stream["base"], "ties")
    assert ties.plan(first).forms["factored"] == 0
    assert main(["plan", str(tmp_path / "t"), str(first)]) == 0
    assert "this method keeps every tensor dense" in capsys.readouterr().out


@pytest.mark.parametrize("method", FACTORED_METHODS)
def test_adapters_mixed_with_full_checkpoints(stream, tmp_path, monkeypatch, method):
    """A checkpoint of one layer turns that layer's tensors dense; the other layer's stay
    factored or zero, and later adapters keep them so."""
    monkeypatch.setattr(lr, "DENSE_RANK_FRACTION", 1.0)
    a0, a1, a2 = stream["adapters"]
    mixed = [a0, (stream["partial"], {"missing": "base"}), a1, a2]
    # Once dense, OPCM's default Gram route carries errors of eps·κ² (`linalg`), so two
    # running sums that differ by round-off (the factored one formed once) move apart by up
    # to ~1e-10 over a few steps in either state; the SVD route keeps them at eps·κ.
    params = {"decomposition": "svd"} if method == "opcm" else {}
    factored, dense = merged_pair(tmp_path, stream["base"], mixed, method, **params)
    assert_same_merge(factored, dense)
    forms = forms_of(factored)
    for name, form in forms.items():
        if ".0." in name:
            assert form == "dense", name
    assert "factored" in {f for n, f in forms.items() if ".1." in n}
    # then a full model: every tensor it gives is dense from there on
    for state in (factored, dense):
        state.add(stream["full"])
    assert_same_merge(factored, dense)
    assert set(forms_of(factored).values()) == {"dense"}


@pytest.mark.parametrize("method", ["opcm", "tsv_m"])
def test_a_stream_that_crosses_the_switch_rule(stream, tmp_path, monkeypatch, method):
    """With a small DENSE_RANK_FRACTION, matrices whose rank bound passes it go dense by
    themselves at that step and stay dense; the merge is the dense one all along."""
    monkeypatch.setattr(lr, "DENSE_RANK_FRACTION", 0.3)  # min(m, n) = 16 here: up to rank 4
    a0, a1, a2 = stream["adapters"]
    factored, dense = merged_pair(tmp_path, stream["base"], [a0], method)
    first = forms_of(factored)
    assert "factored" in first.values()
    for state in (factored, dense):
        for adapter in (a1, a2, a1):
            state.add(adapter, allow_duplicate=True)
    assert_same_merge(factored, dense)
    last = forms_of(factored)
    switched = [n for n, f in first.items() if f == "factored" and last[n] == "dense"]
    assert switched  # the first config again doubles their rank bound past 4
    manifest = json.loads((tmp_path / f"{method}-True" / "manifest.json").read_text())
    for record in manifest["forms"].values():
        assert record["form"] == "zero" or record["width"] <= 0.3 * 16


def test_factored_state_takes_a_fraction_of_the_dense_bytes(tmp_path):
    """Rank-1 adapters on all seven projections of a LLaMA of hidden size 64: the factored
    generation is the factors' bytes (and the headers), a small fraction of the dense one."""
    import transformers
    from lora_helpers import Family, make_adapter, save_base
    from peft import LoraConfig

    from mergestream.step.plan import stored_bytes

    def build():
        config = transformers.LlamaConfig(
            vocab_size=40,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            tie_word_embeddings=False,
        )
        return transformers.LlamaForCausalLM(config)

    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    family = Family("llama64", build, transformers.LlamaForCausalLM, ())
    base = save_base(family, tmp_path / "base")
    adapters = [
        make_adapter(
            family,
            base,
            tmp_path / f"a{i}",
            LoraConfig(r=1, lora_alpha=2, target_modules=projections, init_lora_weights=False),
            seed=i,
        )
        for i in range(2)
    ]
    factored, dense = merged_pair(tmp_path, base, adapters, "opcm")
    assert_same_merge(factored, dense)

    def generation_bytes(state) -> int:
        return sum(p.stat().st_size for p in (state._path / "gen-000002").iterdir())

    f_bytes, d_bytes = generation_bytes(factored), generation_bytes(dense)
    forms = factored.tensor_forms()
    assert sum(f["form"] == "factored" for f in forms.values()) == 14
    assert all(f["rank"] == 2 for f in forms.values() if f["form"] == "factored")
    expected = sum(
        stored_bytes(i, factored.state_form(i.name), 8) for i in factored.infos
    )  # U, σ, V of rank 2 per projection, nothing for the untouched tensors
    assert expected == sum(
        8 * (sum(i.shape) * 2 + 2) for i in factored.infos if len(i.shape) == 2 and "proj" in i.name
    )
    assert expected <= f_bytes <= expected + 16 * 1024  # two files' headers
    assert f_bytes * 12 < d_bytes


@pytest.mark.parametrize("method", ["opcm", "iso_c"])
def test_rank_deficient_and_repeated_adapters_keep_the_true_rank(
    stream, tmp_path, monkeypatch, method
):
    """An adapter whose B factors have a zero column (rank r − 1), merged twice, then another:
    no NaN, and every recorded rank is the dense state's rank, never the sum of the ranks."""
    import shutil

    monkeypatch.setattr(lr, "DENSE_RANK_FRACTION", 1.0)
    source = stream["adapters"][0]
    deficient = tmp_path / "deficient"
    shutil.copytree(source, deficient)
    weights = load_file(str(deficient / "adapter_model.safetensors"))
    for key, tensor in weights.items():
        if key.endswith("lora_B.weight"):
            tensor[:, 1] = 0
    save_file(weights, str(deficient / "adapter_model.safetensors"))
    items = [deficient, deficient, stream["adapters"][1]]
    factored, dense = merged_pair(tmp_path, stream["base"], items[:1], method)
    manifests = []
    for state in (factored, dense):
        for item in items[1:]:
            state.add(item, allow_duplicate=True)
            if state is factored:
                path = tmp_path / f"{method}-True" / "manifest.json"
                manifests.append(json.loads(path.read_text())["forms"])
    assert_same_merge(factored, dense)
    after_repeat = manifests[0]
    touched = [n for n, r in after_repeat.items() if r["form"] == "factored"]
    assert touched
    for name in touched:
        lora = stream_rank(source, name)
        assert after_repeat[name]["rank"] == lora - 1, name  # the zero column is no direction
    final = json.loads((tmp_path / f"{method}-True" / "manifest.json").read_text())["forms"]
    for name, record in final.items():
        if record["form"] == "factored":
            (expected,) = dense.state_tensors(name).values()
            assert record["rank"] == true_rank(expected), name
            svd = factored.state_factors(name)
            assert all(bool(torch.isfinite(t).all()) for t in (svd.u, svd.sigma, svd.v)), name


def stream_rank(adapter, name: str) -> int:
    """The LoRA rank an adapter folder gives base tensor `name` (from its factors' shapes)."""
    from mergestream.io.lora import open_adapter

    opened = open_adapter(adapter)
    try:
        module = name.removesuffix(".weight")
        parsed = opened.modules()[module]
        return opened.weights.spec(parsed.a).shape[0]
    finally:
        opened.close()


def test_a_format_2_state_opens_and_adds_dense(stream, tmp_path):
    """A state written before forms existed (format 2: no `forms`, no `lowrank`) is dense: it
    opens, shows its status, and adds an adapter densely, as a dense-only state does."""
    from mergestream.store.manifest import read_state_status, seal_manifest

    a0, a1 = stream["adapters"][:2]
    path = tmp_path / "old"
    MergeState.create(path, stream["base"], "average", lowrank=False).add(a0)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 2
    for key in ("forms", "lowrank"):
        del manifest[key]
    (path / "manifest.json").write_text(json.dumps(seal_manifest(manifest)))
    assert read_state_status(path, verify=True)["health"]["ok"]
    old = MergeState.open(path)
    old.add(a1)
    upgraded = json.loads((path / "manifest.json").read_text())
    assert upgraded["format_version"] == 3 and upgraded["forms"] == {}
    assert "lowrank" not in upgraded and set(forms_of(old).values()) == {"dense"}
    reference = MergeState.create(tmp_path / "ref", stream["base"], "average", lowrank=False)
    for adapter in (a0, a1):
        reference.add(adapter)
    for (name, got), (_, expected) in zip(
        old.task_vectors(), reference.task_vectors(), strict=True
    ):
        assert torch.equal(got, expected), name


# ------------------------------------------------------------------------------ crash safety


def test_a_factored_step_killed_at_any_instant(stream, zoo, tmp_path):
    """SIGKILL during an adapter's step on a factored state, in every phase (hashing, the
    tensor pass, each fsync of the dense and factor parts, the manifest's rename, the cleanup)
    and at random instants: the state is the previous step or the new one, and the same add
    completes it."""
    import random
    import shutil
    import signal

    from test_crash_safety import DELAY, ForkServer, file_digests, same_weights

    if zoo.family.name != "llama":
        pytest.skip("the phases of a step do not depend on the model: one family is enough")
    a0, a1 = stream["adapters"][:2]
    pristine = tmp_path / "pristine"
    MergeState.create(pristine, stream["base"], "opcm").add(a0)
    assert "factored" in forms_of(MergeState.open(pristine)).values()
    server = ForkServer(tmp_path)
    try:
        reference = tmp_path / "reference"
        shutil.copytree(pristine, reference)
        code, err = server.run(["add", str(reference), str(a1), "--quiet"], DELAY)
        assert code == 0, err
        duration = server.phases[-1][0] - server.started
        phases = [p for _, p in server.phases]
        before = MergeState.open(pristine).state_dict()
        after = MergeState.open(reference).state_dict()
        pristine_files = file_digests(pristine)
        targets = [("start:hashing", 1, 0.05), ("start:step", 1, 0.05)]
        targets += [("fsync", k, 1.5 * DELAY) for k in range(1, phases.count("fsync") + 1)]
        targets += [("replace", 1, 1.5 * DELAY), ("rmtree", 1, 1.5 * DELAY)]
        targets += [("", 1, duration)] * 3
        rng = random.Random(5)
        landed = set()
        for trial, (phase, occurrence, window) in enumerate(targets):
            state_dir = tmp_path / f"trial-{trial}"
            shutil.copytree(pristine, state_dir)
            argv = ["add", str(state_dir), str(a1), "--quiet"]
            code, err, kill = server.kill_during(argv, DELAY, phase, occurrence, window, rng)
            context = f"trial {trial}: {kill}"
            assert code in (0, -signal.SIGKILL), f"{context}: {err}"
            state = MergeState.open(state_dir)
            committed = state.step == 2
            landed.add(committed)
            assert same_weights(state.state_dict(), after if committed else before), context
            if not committed:
                now = file_digests(state_dir)
                for name in pristine_files:
                    if name == "manifest.json" or name.startswith("gen-"):
                        assert now[name] == pristine_files[name], f"{context}: {name} changed"
            code, err = server.run(["add", str(state_dir), str(a1), "--quiet"])
            assert code == (2 if committed else 0), f"{context}: {err}"
            final = MergeState.open(state_dir)
            assert final.step == 2 and same_weights(final.state_dict(), after), context
            if not committed:  # the completed add removed what the killed one left
                leftovers = sorted(p.name for p in state_dir.iterdir())
                assert leftovers == ["gen-000002", "lock", "manifest.json"], context
            shutil.rmtree(state_dir)
        assert landed == {False, True}
    finally:
        server.close()


def test_init_dense_keeps_every_tensor_dense(stream, tmp_path, capsys):
    from mergestream.cli import main

    path = tmp_path / "s"
    assert main(["init", str(path), "--base", str(stream["base"]), "--dense", "--quiet"]) == 0
    assert json.loads((path / "manifest.json").read_text())["lowrank"] is False
    assert main(["add", str(path), str(stream["adapters"][0]), "--quiet"]) == 0
    state = MergeState.open(path)
    assert set(forms_of(state).values()) == {"dense"}
    assert main(["status", str(path)]) == 0
    assert "every tensor dense" in capsys.readouterr().out
