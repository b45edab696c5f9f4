"""The benchmark's method list: the standard set, DOP's reference optimisation by name, and a
clear refusal of an unknown name."""

from __future__ import annotations

import pytest

from mergestream.bench.run import DEFAULT_METHODS, OPTIONAL_METHODS, select_methods
from mergestream.cli import main
from mergestream.methods import get_method


def test_every_listed_method_is_a_valid_configuration():
    labels = [spec.label for spec in DEFAULT_METHODS + OPTIONAL_METHODS]
    assert len(labels) == len(set(labels))
    for spec in DEFAULT_METHODS + OPTIONAL_METHODS:
        get_method(spec.method, **spec.params)
    assert {"iso_c", "tsv_m", "dop"} <= {spec.method for spec in DEFAULT_METHODS}


def test_selection_by_name_label_and_all():
    assert select_methods(None) == DEFAULT_METHODS
    dop = select_methods(["dop"])
    assert [s.method for s in dop] == ["dop", "dop"]
    assert {s.params.get("solver", "adam") for s in dop} == {"exact", "adam"}
    assert select_methods(["Iso-C (c=1.0)", "opcm"]) == tuple(
        s for s in DEFAULT_METHODS if s.method == "opcm" or s.method == "iso_c"
    )
    assert select_methods(["all"]) == DEFAULT_METHODS + OPTIONAL_METHODS


def test_unknown_name_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="'nope'"):
        select_methods(["opcm", "nope"])
    assert main(["bench", str(tmp_path), "--methods", "nope"]) != 0
    assert "unknown benchmark method 'nope'" in capsys.readouterr().err
