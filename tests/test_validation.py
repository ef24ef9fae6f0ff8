"""Validation: every problem in one pass, each with column, row count, examples and what was expected."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from masml.io import load_dataset, read_table, write_table
from masml.schema import COLUMNS, INPUT_NAMES, TRIGGERS
from masml.validation import SchemaValidationError, parse_numeric, validate

DOCS = Path(__file__).resolve().parents[1] / "docs" / "schema.md"


def _text_frame(rows: list[dict]) -> pd.DataFrame:
    """A frame as read from CSV: every value text, empty cell = NaN."""
    return pd.DataFrame(rows).astype("str")


GOOD = [
    {"patient_id": "A", "age_years": "34", "sex": "F", "trigger": "sjia", "ferritin": "5200",
     "hepatomegaly": "1", "mas_onset": "1", "icu_admission": "0"},
    {"patient_id": "B", "age_years": "71.5", "sex": "M", "trigger": "bacterial_sepsis", "ferritin": "",
     "hepatomegaly": "0", "mas_onset": "0", "icu_admission": ""},
    {"patient_id": "C", "age_years": "8", "sex": "F", "trigger": "viral_ebv", "ferritin": "1.5e4",
     "hepatomegaly": "", "mas_onset": "1", "icu_admission": "1"},
]


def _problems(err: SchemaValidationError) -> dict[tuple[str, str], object]:
    return {(p.column, p.check): p for p in err.problems}


# ------------------------------------------------------------------------------- the one bad file


BAD_CSV = """\
patient_id,sex,trigger,ferritin,platelets,temperature_c,crp,mas_onset,icu_admission,true_p_mas_onset,feritin
P1,F,sjia,-5,150,38.5,12,1,1,0.91,100
P2,M,SJIA ,5000,50000,39,>2000,0,,0.12,200
P3,F,covid19,800,90,60,NA,2,,0.22,
P1,M,lymphoma,-1,120,37,"12,5",0,1,0.35,
P5,F,not_a_trigger,1200,,36.5,,1,0,0.50,
"""


def test_one_bad_file_reports_every_problem_at_once(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(BAD_CSV)
    with pytest.raises(SchemaValidationError) as info:
        load_dataset(path)
    err = info.value
    found = _problems(err)
    assert set(found) == {
        ("age_years", "missing_column"),
        ("ferritin", "out_of_range"),
        ("platelets", "out_of_range"),
        ("temperature_c", "out_of_range"),
        ("trigger", "not_in_vocabulary"),
        ("mas_onset", "not_binary"),
        ("crp", "not_numeric"),
        ("patient_id", "duplicate_id"),
        ("true_p_mas_onset", "ground_truth_column"),
        ("feritin", "unknown_column"),
        ("icu_admission", "label_outside_mas"),
    }
    # row counts and examples (rows count data rows from 1)
    expect = {
        ("ferritin", "out_of_range"): (2, [(1, -5.0), (4, -1.0)]),
        ("platelets", "out_of_range"): (1, [(2, 50000.0)]),
        ("temperature_c", "out_of_range"): (1, [(3, 60.0)]),
        ("trigger", "not_in_vocabulary"): (2, [(2, "SJIA "), (5, "not_a_trigger")]),
        ("mas_onset", "not_binary"): (1, [(3, "2")]),
        ("crp", "not_numeric"): (3, [(2, ">2000"), (3, "NA"), (4, "12,5")]),
        ("patient_id", "duplicate_id"): (2, [(1, "P1"), (4, "P1")]),
        ("icu_admission", "label_outside_mas"): (1, [(4, "1")]),
    }
    for key, (n_rows, examples) in expect.items():
        p = found[key]
        assert p.n_rows == n_rows, key
        assert [(e.row, e.value) for e in p.examples] == examples, key
        assert p.expected, key
    assert found[("ferritin", "out_of_range")].examples[0].patient_id == "P1"
    assert found[("age_years", "missing_column")].n_rows == 5
    assert "did you mean 'ferritin'" in str(found[("feritin", "unknown_column")])
    # expected values in plain words
    assert found[("ferritin", "out_of_range")].expected == "a number in ng/mL between 1 and 2000000"
    assert found[("platelets", "out_of_range")].expected == "a number in 10^9/L between 0 and 2000"
    assert found[("trigger", "not_in_vocabulary")].expected.startswith("one of: " + ", ".join(TRIGGERS))
    # the report: a header naming the file, then exactly one line per problem
    lines = str(err).splitlines()
    assert str(path) in lines[0] and "11 problems in 5 rows" in lines[0]
    assert len(lines) == 1 + len(err.problems)
    for p, line in zip(err.problems, lines[1:], strict=True):
        assert line.startswith(f"  - {p.column} [{p.check}]: ")
        assert "expected" in line
    crp_line = next(line for line in lines if line.startswith("  - crp "))
    assert "3 rows: not a number" in crp_line and "row 2 [P2]: '>2000'" in crp_line and "'12,5'" in crp_line


def test_error_is_a_value_error_and_keeps_problems():
    with pytest.raises(ValueError) as info:
        validate(pd.DataFrame({"patient_id": ["a"]}))
    assert isinstance(info.value, SchemaValidationError)
    assert {p.column for p in info.value.problems} == {"age_years", "sex", "trigger"}


# --------------------------------------------------------------------------------- the valid path


def test_valid_frame_types_order_missing_and_notes():
    frame = validate(_text_frame(GOOD))
    assert list(frame.columns) == ["patient_id", *INPUT_NAMES, "mas_onset", "icu_admission"]
    for name in ("patient_id", "sex", "trigger"):
        assert frame[name].dtype == "str"
    for name in (*INPUT_NAMES, "mas_onset", "icu_admission"):
        if COLUMNS[name].kind != "category":
            assert frame[name].dtype == "float64", name
    assert frame["age_years"].tolist() == [34.0, 71.5, 8.0]
    assert np.isnan(frame["ferritin"].iloc[1]) and frame["ferritin"].iloc[2] == 15_000.0
    assert frame["hepatomegaly"].iloc[:2].tolist() == [1.0, 0.0] and np.isnan(frame["hepatomegaly"].iloc[2])
    # absent optional inputs: added, all missing (never 0), and said so
    absent = frame.attrs["absent_columns"]
    assert "platelets" in absent and "ferritin" not in absent and "sex" not in absent
    assert frame[absent].isna().all().all()
    assert frame.attrs["validation_notes"][0].startswith(f"{len(absent)} optional input columns absent")
    assert "platelets" in frame.attrs["validation_notes"][0]


@pytest.mark.parametrize(
    "value", ["1", "0", "1.0", "0.0", " 1", 1, 0, 1.0, 0.0, True, False, "True", "false"]
)
def test_binary_accepts_zero_one_spellings(value):
    rows = [dict(GOOD[0], hepatomegaly=value)]
    df = pd.DataFrame(rows)
    frame = validate(df)
    assert frame["hepatomegaly"].iloc[0] == float(value in ("1", "1.0", " 1", 1, 1.0, True, "True"))


@pytest.mark.parametrize("value", ["yes", "2", "-1", "0.5", "NA", "y"])
def test_binary_rejects_other_values(value):
    with pytest.raises(SchemaValidationError) as info:
        validate(_text_frame([dict(GOOD[0], splenomegaly=value)]))
    (p,) = info.value.problems
    assert (p.column, p.check, p.n_rows) == ("splenomegaly", "not_binary", 1)
    assert p.examples[0].value == value


@pytest.mark.parametrize("value", ["SJIA", "sjia ", " sjia", "Sjia", "sJIA"])
def test_trigger_case_and_whitespace_variants_are_errors(value):
    with pytest.raises(SchemaValidationError) as info:
        validate(_text_frame([dict(GOOD[0], trigger=value)]))
    (p,) = info.value.problems
    assert p.check == "not_in_vocabulary" and p.examples[0].value == value
    assert "sjia" in p.expected and "lymphoma" in p.expected


def test_sex_vocabulary():
    with pytest.raises(SchemaValidationError) as info:
        validate(_text_frame([dict(GOOD[0], sex="f"), dict(GOOD[1], sex="X")]))
    (p,) = info.value.problems
    assert (p.column, p.n_rows) == ("sex", 2)
    assert p.expected == "one of: F, M (exact spelling, no surrounding spaces)"


def test_required_values_may_not_be_missing():
    rows = [dict(GOOD[0], age_years="", sex=""), dict(GOOD[1], patient_id="")]
    with pytest.raises(SchemaValidationError) as info:
        validate(_text_frame(rows))
    found = _problems(info.value)
    assert set(found) == {
        ("age_years", "null_in_required"),
        ("sex", "null_in_required"),
        ("patient_id", "null_in_required"),
    }
    assert found[("patient_id", "null_in_required")].examples[0].row == 2


@pytest.mark.parametrize(
    "value", ["NA", "null", "None", "nan", "inf", "-", ">2000", "<5", "12,5", "1 000", "5%"]
)
def test_non_numeric_strings_are_reported_not_made_missing(value):
    with pytest.raises(SchemaValidationError) as info:
        validate(_text_frame([dict(GOOD[0], ferritin=value)]))
    (p,) = info.value.problems
    assert (p.column, p.check, p.examples[0].value) == ("ferritin", "not_numeric", value)


def test_ranges_are_inclusive():
    low, high = COLUMNS["temperature_c"].low, COLUMNS["temperature_c"].high
    rows = [dict(GOOD[0], temperature_c=str(low)), dict(GOOD[1], temperature_c=str(high))]
    ok = validate(_text_frame(rows))
    assert ok["temperature_c"].tolist() == [low, high]
    with pytest.raises(SchemaValidationError):
        validate(_text_frame([dict(GOOD[0], temperature_c=str(np.nextafter(high, 100)))]))


def test_mas_only_labels():
    ok = validate(_text_frame(GOOD))  # values only where mas_onset is 1, or empty
    assert ok["icu_admission"].tolist()[0] == 0.0
    rows = [dict(GOOD[1], icu_admission="0", death_28d="1")]
    with pytest.raises(SchemaValidationError) as info:
        validate(_text_frame(rows))
    assert {(p.column, p.check) for p in info.value.problems} == {
        ("icu_admission", "label_outside_mas"),
        ("death_28d", "label_outside_mas"),
    }


def test_mas_only_label_without_mas_onset_is_noted():
    rows = [{k: v for k, v in r.items() if k != "mas_onset"} for r in GOOD]
    frame = validate(_text_frame(rows))
    assert "mas_onset" not in frame.columns
    assert any("not checked against mas_onset" in n for n in frame.attrs["validation_notes"])


def test_require_labels():
    rows = [{k: v for k, v in r.items() if k not in ("mas_onset", "icu_admission")} for r in GOOD]
    frame = validate(_text_frame(rows))
    assert not {"mas_onset", "icu_admission"} & set(frame.columns)
    with pytest.raises(SchemaValidationError) as info:
        validate(_text_frame(rows), require_labels=["mas_onset"])
    (p,) = info.value.problems
    assert (p.column, p.check) == ("mas_onset", "missing_column")
    with pytest.raises(ValueError, match="not in the schema"):
        validate(_text_frame(rows), require_labels=["mas_onsett"])


def test_ground_truth_only_when_allowed():
    rows = [dict(r, true_p_mas_onset=str(i / 10)) for i, r in enumerate(GOOD)]
    with pytest.raises(SchemaValidationError) as info:
        validate(_text_frame(rows))
    assert [(p.column, p.check) for p in info.value.problems] == [("true_p_mas_onset", "ground_truth_column")]
    frame = validate(_text_frame(rows), allow_ground_truth=True)
    assert frame.columns[-1] == "true_p_mas_onset"


def test_duplicate_column_names(tmp_path):
    path = tmp_path / "d.csv"
    write_table(_text_frame(GOOD), path)
    text = path.read_text().splitlines()
    path.write_text("\n".join([text[0] + ",ferritin", *(line + ",1" for line in text[1:])]) + "\n")
    with pytest.raises(SchemaValidationError) as info:
        validate(read_table(path))
    (p,) = info.value.problems
    assert (p.column, p.check) == ("ferritin", "duplicate_column")


def test_typed_parquet_values(tmp_path):
    df = pd.DataFrame(
        {
            "patient_id": [101, 102],
            "age_years": pd.array([30, 40], dtype="Int64"),
            "sex": pd.Categorical(["F", "M"]),
            "trigger": ["sle", "drug"],
            "hepatomegaly": pd.array([True, None], dtype="boolean"),
            "ferritin": [np.inf, 500.0],
            "platelets": [True, False],
        }
    )
    with pytest.raises(SchemaValidationError) as info:
        load_dataset(write_table(df, tmp_path / "d.parquet"))
    assert {(p.column, p.check) for p in info.value.problems} == {
        ("ferritin", "not_numeric"),  # inf is not a finite number
        ("platelets", "not_numeric"),  # a boolean is not a platelet count
    }
    frame = load_dataset(write_table(df.drop(columns=["ferritin", "platelets"]), tmp_path / "ok.parquet"))
    assert frame["patient_id"].tolist() == ["101", "102"]
    assert frame["age_years"].dtype == "float64" and frame["sex"].dtype == "str"
    assert frame["hepatomegaly"].iloc[0] == 1.0 and np.isnan(frame["hepatomegaly"].iloc[1])


def test_parse_numeric_flags_bad_text_and_keeps_missing_apart():
    s = pd.Series(["1.5", "", None, " 2 ", "x", "1e3", "nan"], dtype="str")
    values, bad, missing = parse_numeric(s)
    assert missing.tolist() == [False, True, True, False, False, False, False]
    assert bad.tolist() == [False, False, False, False, True, False, True]
    assert values[[0, 3, 5]].tolist() == [1.5, 2.0, 1000.0]


def test_index_is_kept():
    df = _text_frame(GOOD)
    df.index = [10, 20, 30]
    assert validate(df).index.tolist() == [10, 20, 30]


def test_docs_list_every_column_with_its_unit_and_range():
    text = DOCS.read_text(encoding="utf-8")
    for col in COLUMNS.values():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{col.name}` ")), None)
        assert row is not None, col.name
        if col.kind == "numeric":
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert col.unit in cells, col.name
            assert re.sub(r"[ ,]", "", cells[3]) == f"{col.low:.10g}–{col.high:.10g}", col.name
    for trigger in TRIGGERS:
        assert f"`{trigger}`" in text
