"""PEFT LoRA adapters as inputs: exact task vectors, mixed streams, refusals, ledger and plan.

References are computed independently with PEFT itself: `merge_and_unload()` of the same adapter,
saved as a full float64 model, minus the base. In float64 that reference differs from the exact
`scaling·B·A` by the rounding of base + Δ (|error| ≤ 2⁻⁵³·|base + Δ| per entry) and of PEFT's own
product, so task vectors agree to ~1e-16 relative; the tests allow 1e-12 (reading) and 1e-10
(after a merge, whose kernels add their own float64 round-off).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from lora_helpers import (
    BERT,
    FAMILIES,
    LLAMA,
    Zoo,
    edit_json,
    make_adapter,
    state_dict_of,
)
from safetensors.torch import load_file, save_file

from mergestream.cli import main
from mergestream.errors import CheckpointError, StateError
from mergestream.io.lora import LoraSource, base_identity, open_adapter
from mergestream.io.mapping import NameMapping
from mergestream.io.open import open_checkpoint
from mergestream.methods import METHODS
from mergestream.state import MergeState
from mergestream.step import engine

LLAMA_VOCAB = 40
READ_TOLERANCE = 1e-12
MERGE_TOLERANCE = 1e-10


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.name)
def zoo(request, tmp_path_factory) -> Zoo:
    return Zoo(request.param, tmp_path_factory.mktemp(request.param.name))


def _bind(zoo: Zoo, adapter: Path) -> LoraSource:
    base = open_checkpoint(zoo.base)
    return open_adapter(adapter).bind(base, NameMapping(), base_identity(str(zoo.base), zoo.base))


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """‖ours − reference‖ / ‖reference‖; a zero reference must be matched exactly."""
    if reference.norm() == 0:
        return 0.0 if torch.equal(ours, reference) else float("inf")
    return float((ours - reference).norm() / reference.norm())


# ------------------------------------------------------------------------------ reading


def test_task_vector_equals_merge_and_unload(zoo: Zoo) -> None:
    base = state_dict_of(zoo.base)
    for adapter, merged_dir in zip(zoo.adapters, zoo.merged, strict=True):
        source = _bind(zoo, adapter)
        merged = state_dict_of(merged_dir)
        assert set(source.names()) == {n for n in base if base[n].dtype.is_floating_point}
        changed = {n for n in base if not torch.equal(merged[n], base[n])}
        assert changed == set(source.touched()), adapter
        for name in source.names():
            tau = source.task_vector(name, "cpu")
            assert tau.dtype == torch.float64 and tau.shape == base[name].shape
            reference = merged[name] - base[name]
            if name in changed:
                assert _relative_error(tau, reference) <= READ_TOLERANCE, (adapter, name)
            else:
                assert torch.equal(tau, torch.zeros_like(tau)), (adapter, name)


def test_task_rows_are_rows_of_the_task_vector(zoo: Zoo) -> None:
    source = _bind(zoo, zoo.adapters[0])
    for name in source.touched():
        whole = source.task_vector(name, "cpu")
        rows = whole.shape[0]
        cuts = [0, 1, rows // 2, rows]
        blocks = [source.task_rows(name, a, b, "cpu") for a, b in zip(cuts, cuts[1:], strict=False)]
        assert _relative_error(torch.cat(blocks), whole) <= 1e-14, name


def test_factors_and_options_read_as_configured() -> None:
    """The scaling rules, checked on the configs the zoo uses (independently of PEFT's code)."""
    from mergestream.io.lora import AdapterConfig

    config = AdapterConfig(
        r=4,
        lora_alpha=8,
        use_rslora=False,
        fan_in_fan_out=False,
        rank_pattern={"value": 2, "intermediate.dense": 3},
        alpha_pattern={"query": 5},
        base_model_name_or_path=None,
        modules_to_save=[],
    )
    assert config.rank_and_alpha("encoder.layer.0.attention.self.value") == (2, 8)
    assert config.rank_and_alpha("encoder.layer.1.intermediate.dense") == (3, 8)
    assert config.rank_and_alpha("encoder.layer.1.output.dense") == (4, 8)
    assert config.rank_and_alpha("encoder.layer.0.attention.self.query") == (4, 5)
    assert config.scaling(4, 8) == 2.0
    rs = AdapterConfig(**{**config.__dict__, "use_rslora": True})
    assert rs.scaling(4, 8) == 4.0


# ------------------------------------------------------------------------------ merging


# TSV-M too: a LoRA task vector of rank r < min(m, n) has singular values that are exactly zero
# from B·A and round-off from base + τ − base; the σ = 0 rule (linalg.rank_rtol) leaves both
# out, so the two routes give the same merge (before the rule, TSV-M kept null-space triplets,
# whatever vectors the SVD picked, which bent its polar factors: results 10-50 % apart).
@pytest.mark.parametrize("method", sorted(METHODS))
def test_mixed_stream_equals_merging_the_full_models(zoo: Zoo, method: str, monkeypatch) -> None:
    """Adapters and a full checkpoint in one stream give the merge of PEFT's merged models."""

    def no_full_tensors(*_):  # noqa: ANN002, ANN202
        raise AssertionError("the merge must use the factors, not base + τ")

    monkeypatch.setattr(LoraSource, "get", no_full_tensors)
    ours = MergeState.in_memory(zoo.base, method, state_dtype="float64")
    reference = MergeState.in_memory(zoo.base, method, state_dtype="float64")
    for item, full in (
        (zoo.adapters[0], zoo.merged[0]),
        (zoo.full, zoo.full),
        (zoo.adapters[1], zoo.merged[1]),
    ):
        ours.add(item, allow_duplicate=True)
        reference.add(full, allow_duplicate=True)
    expected = dict(reference.task_vectors())
    errors = {name: _relative_error(tau, expected[name]) for name, tau in ours.task_vectors()}
    for name, error in errors.items():
        assert error <= MERGE_TOLERANCE, (method, name, error)
    for key, value in ours.scalars.items():
        assert value == pytest.approx(reference.scalars[key], rel=MERGE_TOLERANCE), key


@pytest.mark.parametrize("method", ["opcm", "ties"])
def test_streamed_rows_give_the_same_merge(monkeypatch, tmp_path, method: str) -> None:
    """Large tensors are folded by row blocks through `task_rows`: same result as whole."""
    zoo = Zoo(LLAMA, tmp_path)

    def merge() -> dict[str, torch.Tensor]:
        state = MergeState.in_memory(zoo.base, method, state_dtype="float64")
        for adapter in zoo.adapters:
            state.add(adapter, allow_duplicate=True)
        return dict(state.task_vectors())

    whole = merge()
    monkeypatch.setattr(engine, "STREAM_MIN_ELEMENTS", 64)
    monkeypatch.setattr(engine, "ROW_BLOCK_ELEMENTS", 100)
    row_reads: list[tuple[str, int, int]] = []
    task_rows = LoraSource.task_rows

    def counted(self, name, start, stop, device):  # noqa: ANN001, ANN202
        row_reads.append((name, start, stop))
        return task_rows(self, name, start, stop, device)

    def no_full_tensors(*_):  # noqa: ANN002, ANN202
        raise AssertionError("the merge must use the factors, not base + τ")

    monkeypatch.setattr(LoraSource, "task_rows", counted)
    monkeypatch.setattr(LoraSource, "get", no_full_tensors)
    monkeypatch.setattr(LoraSource, "get_rows", no_full_tensors)
    streamed = merge()
    assert any(stop - start < LLAMA_VOCAB for _, start, stop in row_reads)  # by row blocks
    for name, tau in whole.items():
        if tau.norm() == 0:
            assert torch.equal(streamed[name], tau), name
        else:
            assert _relative_error(streamed[name], tau) <= MERGE_TOLERANCE, name


# ------------------------------------------------------------------------------ ledger, plan


@pytest.fixture(scope="module")
def bert_zoo(tmp_path_factory) -> Zoo:
    return Zoo(BERT, tmp_path_factory.mktemp("bert_zoo"))


def test_ledger_records_adapter_hash_rank_and_targets(bert_zoo: Zoo, tmp_path) -> None:
    zoo = bert_zoo
    state = MergeState.create(tmp_path / "state", zoo.base, "opcm")
    state.add(zoo.adapters[0])
    entry = MergeState.open(tmp_path / "state").ledger[0]
    adapter = zoo.adapters[0]
    digest = hashlib.sha256(
        (adapter / "adapter_config.json").read_bytes()
        + (adapter / "adapter_model.safetensors").read_bytes()
    ).hexdigest()
    assert entry["sha256"] == digest
    recorded = entry["adapter"]
    assert recorded["kind"] == "lora"
    assert recorded["ranks"] == [2, 3, 4]
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    expected_targets = sorted(
        k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        for k in weights
        if ".lora_A." in k
    )
    assert recorded["targets"] == expected_targets
    assert recorded["full"] == ["pooler.dense.bias", "pooler.dense.weight"]
    with pytest.raises(StateError, match="already merged at step 1"):
        state.add(adapter)


def test_plan_lists_the_tensors_an_adapter_touches(bert_zoo: Zoo, tmp_path, capsys) -> None:
    zoo = bert_zoo
    MergeState.create(tmp_path / "state", zoo.base, "opcm")
    plan = MergeState.open(tmp_path / "state").plan(zoo.adapters[1])
    touched = plan.adapter["touched"]
    assert set(touched) == set(_bind(zoo, zoo.adapters[1]).touched())
    assert all(how == "lora r=3" for how in touched.values())
    assert main(["plan", str(tmp_path / "state"), str(zoo.adapters[1])]) == 0
    out = capsys.readouterr().out
    assert "adapter:  LoRA rank 3" in out
    for name in touched:
        assert name in out


def test_cli_adds_adapters_and_full_checkpoints(bert_zoo: Zoo, tmp_path, capsys) -> None:
    zoo = bert_zoo
    state_dir = tmp_path / "state"
    assert main(["init", str(state_dir), "--base", str(zoo.base), "--quiet"]) == 0
    args = [str(zoo.adapters[0]), str(zoo.full), str(zoo.adapters[1]), "--quiet"]
    assert main(["add", str(state_dir), *args]) == 0
    state = MergeState.open(state_dir)
    assert state.step == 3
    assert ["adapter" in e for e in state.ledger] == [True, False, True]
    capsys.readouterr()
    assert main(["status", str(state_dir)]) == 0
    targets = len(state.ledger[2]["adapter"]["targets"])
    assert f"LoRA r=3 on {targets} tensors" in capsys.readouterr().out


# ------------------------------------------------------------------------------ refusals


def _copy(adapter: Path, tmp_path: Path, name: str = "bad") -> Path:
    target = tmp_path / name
    shutil.copytree(adapter, target)
    return target


def _snapshot(state_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(state_dir)): p.read_bytes() for p in state_dir.rglob("*") if p.is_file()
    }


def _expect_refusal(state_dir: Path, adapter: Path, *patterns: str, **options) -> None:
    """`add` refuses `adapter` with a message matching every pattern; the state is unchanged."""
    before = _snapshot(state_dir)
    state = MergeState.open(state_dir)
    with pytest.raises(CheckpointError) as raised:
        state.add(adapter, **options)
    message = str(raised.value)
    for pattern in patterns:
        assert pattern in message, (pattern, message)
    assert _snapshot(state_dir) == before
    assert MergeState.open(state_dir).step == 1


@pytest.fixture
def bert_state(bert_zoo: Zoo, tmp_path) -> Path:
    state_dir = tmp_path / "state"
    MergeState.create(state_dir, bert_zoo.base, "opcm").add(bert_zoo.full)
    return state_dir


def test_refuses_an_adapter_without_its_config(bert_zoo: Zoo, bert_state: Path, tmp_path) -> None:
    bad = _copy(bert_zoo.adapters[1], tmp_path)
    (bad / "adapter_config.json").unlink()
    _expect_refusal(bert_state, bad, str(bad / "adapter_config.json"), "missing")


def test_refuses_dora(bert_zoo: Zoo, bert_state: Path, tmp_path) -> None:
    from peft import LoraConfig

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query"], use_dora=True)
    dora = make_adapter(BERT, bert_zoo.base, tmp_path / "dora", config, seed=3)
    _expect_refusal(bert_state, dora, str(dora / "adapter_config.json"), "DoRA")
    # The magnitudes alone, with a config that hides them, are refused by the weight file.
    edit_json(dora / "adapter_config.json", use_dora=False)
    _expect_refusal(bert_state, dora, str(dora / "adapter_model.safetensors"), "DoRA magnitudes")


@pytest.mark.parametrize("kind", ["LOHA", "LOKR", "IA3"])
def test_refuses_other_peft_methods(bert_zoo: Zoo, bert_state: Path, tmp_path, kind) -> None:
    import peft

    config = {
        "LOHA": lambda: peft.LoHaConfig(r=2, target_modules=["query"]),
        "LOKR": lambda: peft.LoKrConfig(r=2, target_modules=["query"]),
        "IA3": lambda: peft.IA3Config(target_modules=["query"], feedforward_modules=[]),
    }[kind]()
    torch.manual_seed(0)
    model = peft.get_peft_model(BERT.model_class.from_pretrained(bert_zoo.base), config)
    model.save_pretrained(tmp_path / kind)
    _expect_refusal(bert_state, tmp_path / kind, "adapter_config.json", f"a {kind} adapter")


def test_base_name_must_match_unless_forced(bert_zoo: Zoo, bert_state: Path, tmp_path) -> None:
    adapter = _copy(bert_zoo.adapters[1], tmp_path)
    config = adapter / "adapter_config.json"
    edit_json(config, base_model_name_or_path="someone/other-model")
    _expect_refusal(bert_state, adapter, str(config), "'someone/other-model'", "--force-base")
    edit_json(config, base_model_name_or_path=None)
    _expect_refusal(bert_state, adapter, str(config), "base_model_name_or_path is not set")
    # A hub ID whose model name is the base folder's name matches.
    edit_json(config, base_model_name_or_path=f"someone/{bert_zoo.base.name}")
    plan = MergeState.open(bert_state).plan(adapter)
    assert plan.adapter["base_model_name_or_path"] == f"someone/{bert_zoo.base.name}"
    edit_json(config, base_model_name_or_path="someone/other-model")
    MergeState.open(bert_state).add(adapter, force_base=True)
    assert MergeState.open(bert_state).step == 2


def test_base_name_matches_the_bases_config_name(bert_zoo: Zoo, tmp_path) -> None:
    base = shutil.copytree(bert_zoo.base, tmp_path / "renamed-base")
    edit_json(base / "config.json", _name_or_path="org/tiny-bert")
    adapter = _copy(bert_zoo.adapters[1], tmp_path)
    edit_json(adapter / "adapter_config.json", base_model_name_or_path="org/tiny-bert")
    state = MergeState.create(tmp_path / "state", base, "task_arithmetic")
    state.add(adapter)
    assert state.step == 1


def test_refuses_factors_that_do_not_fit(bert_zoo: Zoo, bert_state: Path, tmp_path) -> None:
    # An adapter of a wider model: forced past the name check, stopped by the shapes.
    from peft import LoraConfig

    wide = BERT.build().config
    wide.hidden_size, wide.intermediate_size = 32, 48
    other_base = tmp_path / "wide-base"
    torch.manual_seed(0)
    BERT.model_class(wide).save_pretrained(other_base)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query"], init_lora_weights=False)
    adapter = make_adapter(BERT, other_base, tmp_path / "wide", config, seed=1)
    weights = adapter / "adapter_model.safetensors"
    _expect_refusal(bert_state, adapter, str(weights), "do not fit", force_base=True)
    # The configured rank disagrees with the factors.
    adapter = _copy(bert_zoo.adapters[1], tmp_path, "rank")
    edit_json(adapter / "adapter_config.json", r=5)
    _expect_refusal(bert_state, adapter, "adapter_model.safetensors", "at rank 5")


def test_refuses_an_unknown_target_module(bert_zoo: Zoo, bert_state: Path, tmp_path) -> None:
    adapter = _copy(bert_zoo.adapters[1], tmp_path)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    renamed = {k.replace("self.key", "self.nope"): v for k, v in tensors.items()}
    save_file(renamed, str(weights))
    _expect_refusal(bert_state, adapter, str(weights), "attention.self.nope.weight", "not a")


def test_refuses_non_finite_factors(bert_zoo: Zoo, bert_state: Path, tmp_path) -> None:
    adapter = _copy(bert_zoo.adapters[1], tmp_path)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(weights))
    _expect_refusal(bert_state, adapter, str(weights), "NaN")


def test_an_adapter_is_not_a_base(bert_zoo: Zoo, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="a LoRA adapter cannot be a merge's base"):
        MergeState.create(tmp_path / "state", bert_zoo.adapters[0], "opcm")
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())


def test_adapter_of_a_task_model_fits_the_bare_base_by_name_options(bert_zoo: Zoo, tmp_path):
    """An adapter trained on BertForSequenceClassification names modules `bert.encoder...` and
    saves its new classifier whole: refused with a hint, then merged with strip_prefix and
    extra="ignore", equal to the adapter made on the bare model with the same factors."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    task_model = transformers.BertForSequenceClassification.from_pretrained(
        bert_zoo.base, dtype=torch.float64, num_labels=3
    )
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        init_lora_weights=False,
    )
    peft_model = get_peft_model(task_model, config)
    peft_model.save_pretrained(tmp_path / "task_adapter")
    state_dir = tmp_path / "state"
    MergeState.create(
        state_dir, bert_zoo.base, "task_arithmetic", state_dtype="float64", scaling_factor=1.0
    )
    state = MergeState.open(state_dir)
    with pytest.raises(CheckpointError, match="strip_prefix='bert.'"):
        state.add(tmp_path / "task_adapter")
    with pytest.raises(CheckpointError, match="classifier"):
        state.add(tmp_path / "task_adapter", strip_prefix="bert.")
    state.add(tmp_path / "task_adapter", strip_prefix="bert.", extra="ignore")
    entry = MergeState.open(state_dir).ledger[0]
    assert sorted(entry["adapter"]["ignored"]) == [
        "base_model.model.classifier.bias",
        "base_model.model.classifier.weight",
    ]
    merged_model = peft_model.merge_and_unload()
    base = state_dict_of(bert_zoo.base)
    for name, tau in MergeState.open(state_dir).task_vectors():
        reference = merged_model.state_dict()["bert." + name] - base[name]
        assert _relative_error(tau, reference) <= MERGE_TOLERANCE, name
