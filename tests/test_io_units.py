"""Reading/writing tables and converting local laboratory units to masml's canonical units."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from masml.io import load_dataset, read_table, write_table
from masml.schema import COLUMNS, NUMERIC_INPUTS
from masml.units import UnitError, accepted_units, conversion_for, resolve_units, to_canonical
from masml.validation import SchemaValidationError


def _valid_frame(n: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "patient_id": [f"P{i}" for i in range(n)],
            "age_years": rng.uniform(1, 90, n),
            "sex": ["F", "M"] * (n // 2),
            "trigger": ["sjia", "covid19", "lymphoma"] * (n // 3),
            "ferritin": [1 + 1 / 3, 12_345.678_901_234_5, np.nan, 0.1 + 0.2 + 1, 2e5, 7.0][:n],
            "platelets": rng.uniform(0, 400, n),
            "fibrinogen": [150.0, np.nan, 300.0, 420.0, 99.9, 5.0][:n],
            "hepatomegaly": [1.0, 0.0, np.nan, 1.0, 0.0, np.nan][:n],
            "mas_onset": [1.0, 0.0, 1.0, 0.0, 1.0, 0.0][:n],
            "icu_admission": [1.0, np.nan, 0.0, np.nan, np.nan, np.nan][:n],
        }
    )


# ------------------------------------------------------------------------------------------------ io


def test_csv_round_trip_is_exact_and_keeps_missing(tmp_path):
    rng = np.random.default_rng(1)
    floats = np.concatenate([rng.lognormal(3, 4, 500), [0.1, 1 / 3, 1e-300, 2.5e17, -0.0]])
    floats[::7] = np.nan
    df = pd.DataFrame({"x": floats, "s": pd.Series(["a", None, "c", ""] * 126 + ["d"], dtype=object)})
    path = write_table(df, tmp_path / "t.csv")
    text = path.read_text()
    assert "nan" not in text.lower() and "None" not in text
    back = read_table(path)
    assert back["x"].dtype == "str"  # CSV is read as text: validation does the parsing
    parsed = back["x"].astype("float64").to_numpy()
    assert np.array_equal(parsed, floats, equal_nan=True)  # bit-exact, NaN where it was
    assert back["s"].isna().sum() == df["s"].isna().sum() + (df["s"] == "").sum()


def test_parquet_round_trip_keeps_types(tmp_path):
    df = _valid_frame()
    path = write_table(df, tmp_path / "t.parquet")
    back = read_table(path)
    pd.testing.assert_frame_equal(back, df)
    assert read_table(write_table(df, tmp_path / "t.pq")).equals(df)


def test_written_files_do_not_carry_attrs(tmp_path):
    df = _valid_frame()
    df.attrs["validation_notes"] = ["stale"]
    assert read_table(write_table(df, tmp_path / "t.parquet")).attrs == {}


@pytest.mark.parametrize("ext", [".csv", ".parquet"])
def test_load_dataset_round_trip(tmp_path, ext):
    df = _valid_frame()
    frame = load_dataset(write_table(df, tmp_path / f"d{ext}"))
    for col in df.columns:
        if df[col].dtype == "float64":
            assert np.array_equal(frame[col].to_numpy(), df[col].to_numpy(), equal_nan=True), col
        else:
            assert frame[col].tolist() == df[col].tolist(), col


@pytest.mark.parametrize("name", ["data.xlsx", "data.txt", "data"])
def test_unsupported_extension(tmp_path, name):
    with pytest.raises(ValueError, match=r"unsupported file type .*data.*\.csv, \.parquet, \.pq"):
        read_table(tmp_path / name)
    with pytest.raises(ValueError, match="unsupported file type"):
        write_table(_valid_frame(), tmp_path / name)


def test_csv_na_like_strings_stay_text(tmp_path):
    (tmp_path / "t.csv").write_text("a,b\nNA,\nnull,1\nNone,2\n")
    back = read_table(tmp_path / "t.csv")
    assert back["a"].tolist() == ["NA", "null", "None"]
    assert back["b"].isna().tolist() == [True, False, False]


def test_csv_duplicate_header_is_kept_for_validation(tmp_path):
    (tmp_path / "t.csv").write_text("patient_id,ferritin,ferritin\nP1,1,2\n")
    assert list(read_table(tmp_path / "t.csv").columns) == ["patient_id", "ferritin", "ferritin"]


def test_malformed_csv_names_the_file(tmp_path):
    (tmp_path / "t.csv").write_text("a,b\n1,2,3,4\n")
    with pytest.raises(ValueError, match=r"cannot parse .*t\.csv"):
        read_table(tmp_path / "t.csv")


# --------------------------------------------------------------------------------------------- units

CONVERSIONS = [
    ("fibrinogen", "g/L", 1.5, 150.0),
    ("fibrinogen", "mg/L", 1500.0, 150.0),
    ("fibrinogen", "µmol/L", 10.0, 340.0),
    ("triglycerides", "mmol/L", 1.5, 132.855),
    ("triglycerides", "g/L", 2.0, 200.0),
    ("creatinine", "umol/L", 88.42, 1.0),
    ("creatinine", "µmol/L", 176.84, 2.0),
    ("creatinine", "μmol/L", 88.42, 1.0),  # Greek mu
    ("creatinine", "mmol/L", 0.08842, 1.0),
    ("bilirubin", "umol/L", 17.1, 1.0),
    ("bilirubin", "mg/L", 10.0, 1.0),
    ("hemoglobin", "g/L", 120.0, 12.0),
    ("hemoglobin", "mmol/L", 10.0, 16.1145),
    ("crp", "mg/dL", 5.0, 50.0),
    ("crp", "ug/mL", 5.0, 5.0),
    ("albumin", "g/L", 35.0, 3.5),
    ("d_dimer", "ng/mL FEU", 500.0, 0.5),
    ("d_dimer", "µg/mL FEU", 0.5, 0.5),
    ("d_dimer", "ug/L FEU", 500.0, 0.5),
    ("d_dimer", "mg FEU/L", 0.5, 0.5),
    ("d_dimer", "mg/L DDU", 0.25, 0.5),
    ("d_dimer", "ng/mL DDU", 250.0, 0.5),
    ("platelets", "10^3/µL", 150.0, 150.0),
    ("platelets", "x10^9/L", 150.0, 150.0),
    ("platelets", "10*9/L", 150.0, 150.0),
    ("platelets", "G/L", 150.0, 150.0),
    ("platelets", "/µL", 150_000.0, 150.0),
    ("platelets", "cells/mm3", 150_000.0, 150.0),
    ("platelets_prev", "K/uL", 99.0, 99.0),
    ("wbc", "/uL", 12_000.0, 12.0),
    ("wbc", "10^3/mm3", 12.0, 12.0),
    ("neutrophils", "/μL", 800.0, 0.8),
    ("ferritin", "µg/L", 500.0, 500.0),
    ("ferritin", "ug/l", 500.0, 500.0),
    ("ferritin", "mcg/L", 500.0, 500.0),
    ("ferritin", "pmol/L", 2247.0, 1000.0),
    ("ferritin_prev", "pmol/L", 224.7, 100.0),
    ("ast", "IU/L", 40.0, 40.0),
    ("alt", "µkat/L", 1.0, 60.0),
    ("ldh", "ukat/L", 5.0, 300.0),
    ("lactate", "mg/dL", 90.08, 10.0),
    ("sodium", "mEq/L", 140.0, 140.0),
    ("temperature_c", "degF", 100.0, 37.77777777777778),
    ("temperature_c", "°F", 98.6, 37.0),
    ("temperature_c", "F", 212.0, 100.0),
    ("age_years", "months", 18.0, 1.5),
    ("mean_arterial_pressure", "kPa", 10.0, 75.0062),
    ("scd25", "kU/L", 2400.0, 2400.0),
    ("esr", "mm/hr", 30.0, 30.0),
]


@pytest.mark.parametrize(("column", "unit", "value", "expected"), CONVERSIONS)
def test_conversion_factor(column, unit, value, expected):
    out = to_canonical(pd.DataFrame({column: [value, np.nan]}), {column: unit})
    assert out[column].iloc[0] == pytest.approx(expected, rel=1e-9)
    assert np.isnan(out[column].iloc[1])  # missing stays missing


def test_temperature_and_ferritin_values_named_in_the_brief():
    out = to_canonical(
        pd.DataFrame({"temperature_c": [100.0], "triglycerides": ["1.5"], "fibrinogen": ["1.5"]}),
        {"temperature_c": "degF", "triglycerides": "mmol/L", "fibrinogen": "g/L"},
    )
    assert round(out["temperature_c"].iloc[0], 2) == 37.78
    assert out["triglycerides"].iloc[0] == pytest.approx(132.855)
    assert out["fibrinogen"].iloc[0] == pytest.approx(150.0)


@pytest.mark.parametrize("column", NUMERIC_INPUTS)
def test_canonical_unit_is_identity(column):
    conv = conversion_for(column, COLUMNS[column].unit)
    assert conv.is_identity
    assert accepted_units(column)[0] == COLUMNS[column].unit


def test_unknown_unit_names_analyte_unit_and_accepted_units():
    with pytest.raises(UnitError) as err:
        conversion_for("fibrinogen", "mmol/L")
    msg = str(err.value)
    assert "'fibrinogen'" in msg and "'mmol/L'" in msg
    for accepted in ("mg/dL", "g/L", "µmol/L"):
        assert accepted in msg


def test_case_matters_for_giga_per_litre():
    assert conversion_for("platelets", "G/L").is_identity
    with pytest.raises(UnitError, match="'g/L' for 'platelets'"):
        conversion_for("platelets", "g/L")  # grams per litre is not a cell count


@pytest.mark.parametrize(("column", "unit", "reason"), [
    ("scd25", "pg/mL", "assay"),
    ("d_dimer", "mg/L", "FEU"),
    ("d_dimer", "ng/mL", "DDU"),
])
def test_refused_units_give_the_reason(column, unit, reason):
    with pytest.raises(UnitError, match="refused") as err:
        conversion_for(column, unit)
    assert reason in str(err.value)


def test_units_declaration_problems_are_reported_together():
    with pytest.raises(UnitError) as err:
        resolve_units(
            {"feritin": "ng/mL", "sex": "F", "hepatomegaly": "0/1", "fibrinogen": "furlongs", "crp": None}
        )
    msg = str(err.value)
    assert "5 problem(s)" in msg
    assert "'feritin' is not a column of the masml schema" in msg
    assert "'sex' is a category column" in msg
    assert "'hepatomegaly' is a binary column" in msg
    assert "unknown unit 'furlongs' for 'fibrinogen'" in msg
    assert "'crp' must be text" in msg


def test_ground_truth_column_cannot_have_a_unit():
    with pytest.raises(UnitError, match="true_p_mas_onset"):
        resolve_units({"true_p_mas_onset": "ratio"})


def test_units_yaml_on_disk(tmp_path):
    (tmp_path / "units.yaml").write_text(
        "# local lab\nfibrinogen: g/L\ntriglycerides: mmol/L\ncreatinine: umol/L\nbilirubin: µmol/L\n"
        "crp: mg/dL\nhemoglobin: g/L\n",
        encoding="utf-8",
    )
    df = _valid_frame().drop(columns=["fibrinogen"])
    df["fibrinogen"] = [1.5, 3.0, np.nan, 4.0, 2.0, 1.0]
    df["creatinine"] = [88.42, np.nan, 44.21, 88.42, 88.42, 88.42]
    df["hemoglobin"] = [120.0, 95.0, np.nan, 100.0, 80.0, 130.0]
    data = write_table(df, tmp_path / "d.csv")
    frame = load_dataset(data, tmp_path / "units.yaml")
    assert frame["fibrinogen"].tolist()[:2] == pytest.approx([150.0, 300.0])
    assert np.isnan(frame["fibrinogen"].iloc[2])
    assert frame["creatinine"].iloc[2] == pytest.approx(0.5)
    assert frame["hemoglobin"].iloc[0] == pytest.approx(12.0)
    assert frame["ferritin"].iloc[0] == df["ferritin"].iloc[0]  # undeclared: untouched
    notes = "\n".join(frame.attrs["validation_notes"])
    assert "fibrinogen converted from g/L to mg/dL" in notes
    assert "'triglycerides' (mmol/L) but the data has no such column" in notes


@pytest.mark.parametrize(("text", "match"), [
    ("fibrinogen: [g/L\n", "not valid YAML"),
    ("- fibrinogen\n- g/L\n", "must be a mapping"),
])
def test_bad_units_file_names_the_path(tmp_path, text, match):
    path = tmp_path / "units.yaml"
    path.write_text(text)
    with pytest.raises(UnitError, match=match) as err:
        resolve_units(path)
    assert str(path) in str(err.value)


def test_missing_units_file(tmp_path):
    with pytest.raises(UnitError, match="does not exist"):
        resolve_units(tmp_path / "nope.yaml")


def test_to_canonical_keeps_bad_values_and_does_not_touch_other_columns():
    df = pd.DataFrame(
        {"fibrinogen": pd.Series(["1.5", ">20", None, "12,5"], dtype="str"), "crp": ["1", "2", "3", "4"]}
    )
    out = to_canonical(df, {"fibrinogen": "g/L"})
    assert out["fibrinogen"].tolist()[:2] == [150.0, ">20"]
    assert pd.isna(out["fibrinogen"].iloc[2]) and out["fibrinogen"].iloc[3] == "12,5"
    assert out["crp"].tolist() == ["1", "2", "3", "4"]
    assert df["fibrinogen"].iloc[0] == "1.5"  # the input is not modified
    assert out.attrs["unit_conversions"]["fibrinogen"]["factor"] == 100.0


def test_trend_columns_follow_their_analyte_unless_declared():
    df = pd.DataFrame(
        {"ferritin": [2247.0], "ferritin_prev": [2247.0], "platelets": [150_000.0], "platelets_prev": [150.0]}
    )
    out = to_canonical(df, {"ferritin": "pmol/L", "platelets": "/µL", "platelets_prev": "10^9/L"})
    assert out["ferritin_prev"].iloc[0] == pytest.approx(1000.0)
    assert out["platelets"].iloc[0] == pytest.approx(150.0)
    assert out["platelets_prev"].iloc[0] == 150.0  # declared separately: its own unit


def test_out_of_range_after_conversion_mentions_the_declared_unit(tmp_path):
    df = _valid_frame()
    df["fibrinogen"] = [1.5, 30.0, np.nan, 2.0, 2.0, 2.0]  # 30 g/L = 3000 mg/dL: implausible
    with pytest.raises(SchemaValidationError) as err:
        load_dataset(write_table(df, tmp_path / "d.csv"), {"fibrinogen": "g/L"})
    (problem,) = err.value.problems
    assert (problem.column, problem.check, problem.n_rows) == ("fibrinogen", "out_of_range", 1)
    assert problem.examples[0].row == 2 and problem.examples[0].value == pytest.approx(3000.0)
    assert "= 30 g/L in the file" in str(problem)
    assert "declared in g/L" in problem.expected and "mg/dL between 5 and 2000" in problem.expected


@pytest.mark.parametrize(("column", "spelling", "unit"), [
    ("platelets", "×10⁹/L", "10^9/L"),
    ("platelets", "10E9/L", "10^9/L"),
    ("platelets", "x 10^9 / L", "10^9/L"),
    ("platelets", "/mm³", "/µL"),
    ("ferritin", "MCG/L", "ng/mL"),
    ("d_dimer", "FEU mg/L", "mg/L FEU"),
    ("d_dimer", "ng/ml ddu", "ng/mL DDU"),
    ("temperature_c", "°c", "degC"),
])
def test_common_spellings(column, spelling, unit):
    assert conversion_for(column, spelling).unit == unit


def test_manifest_input_spec_carries_every_conversion_a_server_needs():
    """A server without masml converts with the manifest's factors: they must match masml's own."""
    from masml.encoding import input_spec

    for entry in input_spec():
        if entry["kind"] != "numeric":
            assert entry["accepted_units"] is None
            continue
        assert entry["accepted_units"][0]["unit"] == entry["unit"]  # canonical first
        for conv in entry["accepted_units"]:
            for spelling in (conv["unit"], *conv["aliases"], *conv["exact_aliases"]):
                expected = conversion_for(entry["name"], spelling).apply(np.array([2.5]))[0]
                assert 2.5 * conv["factor"] + conv["offset"] == pytest.approx(expected, rel=1e-12)
