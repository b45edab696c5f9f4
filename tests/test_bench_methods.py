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


def test_every_row_has_its_own_short_name():
    rows = DEFAULT_METHODS + OPTIONAL_METHODS
    names = [spec.name for spec in rows]
    assert len(names) == len(set(names)) and all("," not in n for n in names)
    for spec in rows:
        if spec.name != spec.method:  # a variant's own name picks that row alone
            assert select_methods([spec.name]) == (spec,), spec.name
        else:  # a method name picks every row of the method
            assert select_methods([spec.name]) == tuple(s for s in rows if s.method == spec.method)
    assert len(select_methods(["opcm"])) == 4
    picked = select_methods(["dop-exact", "tsv_m", "opcm-paper"])
    assert [s.name for s in picked] == ["opcm-paper", "tsv_m", "dop-exact"]


def test_unknown_name_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="'nope'"):
        select_methods(["opcm", "nope"])
    assert main(["bench", str(tmp_path), "--methods", "nope"]) != 0
    assert "unknown benchmark method 'nope'" in capsys.readouterr().err


def test_a_method_name_that_takes_several_rows_is_named_before_the_run(tmp_path, capsys):
    from mergestream.bench.run import expanded_tokens

    opcm_rows = tuple(s.label for s in DEFAULT_METHODS if s.method == "opcm")
    assert expanded_tokens(["opcm", "tsv_m", "OPCM (alpha=0.5)", "dop-exact"]) == {
        "opcm": opcm_rows
    }
    assert expanded_tokens(None) == {}
    main(["bench", str(tmp_path), "--methods", "opcm,average"])
    err = capsys.readouterr().err
    assert f"--methods 'opcm' takes every row of the method ({len(opcm_rows)})" in err
    assert all(label in err for label in opcm_rows)
    main(["bench", str(tmp_path), "--methods", "OPCM (alpha=0.5)"])
    assert "takes every row" not in capsys.readouterr().err
