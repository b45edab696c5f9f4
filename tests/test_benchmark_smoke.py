"""Smoke test of the OPCM benchmark on a tiny CLIP-shaped zoo: the zoo builder and the
mergestream side of the harness (timing, floor, agreement check, reports). The reference's
virtual environment is never created here: its side runs only in the benchmark itself, and the
agreement check is exercised against an independent float64 implementation of the reference's
update rule instead."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
clip_zoo = importlib.import_module("clip_zoo")
harness = importlib.import_module("opcm_vs_fusionbench")


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zoos")


@pytest.fixture(scope="module")
def zoo(zoo_root):
    spec = clip_zoo.ZooSpec(config=dict(clip_zoo.TINY), models=3)
    return clip_zoo.build_zoo(spec, zoo_root, log=lambda _: None)


def _load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _global_norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def test_zoo_layout_loads_as_clip_vision_model(zoo):
    from transformers import CLIPVisionModel

    assert [p.name for p in zoo.models] == ["task-01", "task-02", "task-03"]
    base = _load(zoo.base)
    assert all(name.startswith("vision_model.") for name in base)
    assert all(t.dtype == torch.float32 for t in base.values())
    _, info = CLIPVisionModel.from_pretrained(str(zoo.models[0]), output_loading_info=True)
    assert not any(info.values()), info  # no missing or unexpected weights


def test_zoo_task_vectors(zoo):
    base = _load(zoo.base)
    base_norm = _global_norm(base.values())
    linear = [n for n, t in base.items() if clip_zoo.is_linear_weight(n, tuple(t.shape))]
    assert len(linear) == 6 * clip_zoo.TINY["num_hidden_layers"]
    for path in zoo.models:
        model = _load(path)
        tau = {k: model[k].double() - base[k].double() for k in base}
        assert torch.count_nonzero(tau[clip_zoo.CLASS_EMBEDDING]) == 0
        assert 0.015 < _global_norm(tau.values()) / base_norm < 0.055
        # Linear weights: most energy in a low-rank part (shared + task-specific ranks).
        sigma = torch.linalg.svdvals(tau[linear[0]])
        rank = clip_zoo.ZooSpec().task_rank + clip_zoo.ZooSpec().shared_rank
        assert float(sigma[:rank].square().sum() / sigma.square().sum()) > 0.85


def test_zoo_is_deterministic_and_grows_in_place(zoo, zoo_root, tmp_path):
    spec = clip_zoo.ZooSpec(config=dict(clip_zoo.TINY), models=2)
    again = clip_zoo.build_zoo(spec, tmp_path, log=lambda _: None)
    first, second = _load(zoo.models[1]), _load(again.models[1])
    assert all(torch.equal(first[k], second[k]) for k in first)

    stamp = (zoo.models[0] / "model.safetensors").stat().st_mtime_ns
    bigger = clip_zoo.build_zoo(
        clip_zoo.ZooSpec(config=dict(clip_zoo.TINY), models=4), zoo_root, log=lambda _: None
    )
    assert bigger.root == zoo.root and bigger.models[:3] == zoo.models
    assert (bigger.models[3] / "model.safetensors").exists()
    assert (zoo.models[0] / "model.safetensors").stat().st_mtime_ns == stamp


def _fusionbench_style_opcm(base, models, alpha):
    """The reference's update rule, written independently in float64 on state dicts: full SVD
    of the previous merged task vector, diagonal and top-left block zeroed, lambda from the
    global norms, class_embedding never merged (only rescaled)."""
    base = {k: v.double() for k, v in base.items()}
    models = [{k: v.double() for k, v in m.items()} for m in models]

    def tv_norm(m):
        return _global_norm(m[k] - base[k] for k in base)

    merged, norms, previous_lambda = dict(models[0]), [tv_norm(models[0])], 1.0
    for model in models[1:]:
        norms.append(tv_norm(model))
        average = sum(norms) / len(norms)
        new = {}
        for name, b in base.items():
            previous, tau = merged[name] - b, model[name] - b
            if name == clip_zoo.CLASS_EMBEDDING:
                new[name] = merged[name]
                continue
            if clip_zoo.is_linear_weight(name, tuple(b.shape)):
                u, s, vh = torch.linalg.svd(previous, full_matrices=True)
                split = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
                p = u.T @ tau @ vh.T
                p.diagonal().fill_(0)
                p[:split, :split] = 0
                tau = u @ p @ vh
            new[name] = b + previous_lambda * previous + tau
        norm = tv_norm(new)
        previous_lambda = norm / average
        merged = {k: base[k] + (new[k] - base[k]) * (average / norm) for k in base}
    return merged


def test_harness_mergestream_side(zoo, zoo_root, tmp_path, capsys):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    out = tmp_path / "results.json"
    argv = [
        "--tiny",
        "--models",
        "3",
        "--zoo-root",
        str(zoo_root),
        "--skip-reference",
        "--work-dir",
        str(tmp_path / "work"),
        "--keep-work",
        "--floor-repeats",
        "1",
        "--out",
        str(out),
        "--write-benchmarks-md",
        "--benchmarks-md",
        str(md),
    ]
    assert harness.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| step | mergestream (s) |" in printed

    results = json.loads(out.read_text())
    ms = results["mergestream"]
    assert [s["step"] for s in ms["steps"]] == [1, 2, 3]
    assert all(s["seconds"] > 0 for s in ms["steps"])
    assert ms["threads"] >= 1
    assert ms["process_peak_rss_mib"] >= max(s["peak_rss_mib"] or 0 for s in ms["steps"]) > 0
    assert ms["method"]["params"]["zero_diagonal"] is True
    assert ms["tensors"]["projected"] == results["zoo"]["linear_weights"] == 12
    floor = results["floor"]
    assert floor["projected"] == 12 and floor["svd_seconds"] > 0 and floor["io_seconds"] > 0
    assert results["summary"]["mergestream_step_over_floor"] > 0
    assert "reference" not in results and "agreement" not in results

    text = md.read_text()
    assert "## Other\n\nkept" in text and text.count(harness.SECTION) == 1

    # The agreement check, against an independent float64 implementation of the reference.
    work = tmp_path / "work" / "opcm-vs-fusionbench"
    reference = _fusionbench_style_opcm(_load(zoo.base), [_load(p) for p in zoo.models], alpha=0.5)
    save_file(reference, str(tmp_path / "reference.safetensors"))
    compared = harness.run_worker(
        "compare",
        {
            "state": str(work / "mergestream-state"),
            "base": str(zoo.base),
            "references": {"float64": str(tmp_path / "reference.safetensors")},
            "exclude": list(harness.EXCLUDED),
        },
        work,
        None,
    )
    assert compared["float64"]["tensors"] == len(_load(zoo.base)) - 1
    assert compared["float64"]["max_relative"] < 1e-8


def test_scale_mode_cycles_models(zoo_root, tmp_path, capsys):
    out = tmp_path / "scale.json"
    argv = ["--tiny", "--models", "2", "--steps", "4", "--zoo-root", str(zoo_root)]
    argv += ["--work-dir", str(tmp_path / "work"), "--out", str(out)]
    assert harness.main(argv) == 0
    assert "s/step" in capsys.readouterr().out
    results = json.loads(out.read_text())
    steps = results["mergestream"]["steps"]
    assert [s["model"] for s in steps] == ["task-01", "task-02", "task-01", "task-02"]
    assert set(results["summary"]) >= {"time_slope_seconds_per_step", "rss_slope_mib_per_step"}
    assert not (tmp_path / "work" / "opcm-scale").exists()


def test_benchmarks_md_section_is_replaced(tmp_path):
    md = tmp_path / "B.md"
    harness.update_benchmarks_md(md, "## A", "first\n")
    harness.update_benchmarks_md(md, "## B", "other\n")
    harness.update_benchmarks_md(md, "## A", "second\n")
    text = md.read_text()
    assert text.startswith("# Benchmarks\n")
    assert "second" in text and "first" not in text and "## B\n\nother" in text
    assert text.count("## A") == 1


def test_slope_and_device_check():
    assert harness.slope([1, 2, 3], [1.0, 3.0, 5.0]) == pytest.approx(2.0)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            harness.check_device("cuda")
