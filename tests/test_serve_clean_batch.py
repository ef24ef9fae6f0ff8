"""The clean-batch fast path (serve/clean_batch.py) against the detailed path (serve/inputs.py).

The contract that keeps two paths honest: the fast path reads a clean batch to exactly the detailed
path's float64 numbers and ids, and says "not clean" (None) for anything the detailed path refuses, so
every error is still worded by the detailed path. Saying "not clean" for a valid body (unit objects)
only costs time, never an answer.
"""

from __future__ import annotations

import random

import msgspec
import numpy as np
import pytest
from test_serve_support import patients_from_frame, tiny_bundle

from masml.io import load_dataset
from serve.problems import Problems

FIELDS = ("patients", "top", "features", "explain")


@pytest.fixture(scope="module")
def onset(tmp_path_factory):
    """The tiny onset bundle as the service loads it, and 80 cohort patients as an app sends them."""
    from serve.bundles import load_model

    cohort, models = tiny_bundle(tmp_path_factory)
    patients = patients_from_frame(load_dataset(cohort).head(80))
    return load_model(models / "onset"), patients


def _detailed(model, body: bytes) -> tuple[np.ndarray, list] | Problems:
    try:
        return model.encoder.encode(msgspec.json.decode(body)["patients"], "patients")
    except Problems as err:
        return err


def _detailed_split(model, body: bytes) -> tuple[np.ndarray, list] | Problems:
    from serve.mlflow_protocol import split_to_records

    try:
        records = split_to_records(msgspec.json.decode(body)["dataframe_split"])
        return model.encoder.encode(records, "dataframe_split.data")
    except Problems as err:
        return err


def _split(batch: list[dict], columns: list[str]) -> bytes:
    """The batch as MLflow's dataframe_split: every column given, None where a patient has no value."""
    data = [[p.get(c) for c in columns] for p in batch]
    return msgspec.json.encode({"dataframe_split": {"columns": columns, "data": data}})


def test_a_clean_batch_reads_to_the_detailed_paths_numbers(onset):
    """Integers, booleans for 0/1 inputs, explicit nulls, fields left out, string and integer ids."""
    model, patients = onset
    mixed = []
    for i, p in enumerate(patients):
        q = dict(p)
        if i % 3 == 0:
            q["age_years"] = int(q["age_years"])
        if i % 4 == 0:
            q["splenomegaly"] = bool(q.get("splenomegaly", 0))
        if i % 5 == 0:
            q["ferritin"] = None
        if i % 6 == 0:
            q.pop("platelets", None)
        if i % 7 == 0:
            q["patient_id"] = i
        if i % 11 == 0:
            q.pop("patient_id", None)
        mixed.append(q)
    body = msgspec.json.encode({"patients": mixed, "top": 3, "explain": True})
    got = model.clean.read(body, FIELDS)
    assert got is not None
    given, x, ids = got
    want_x, want_ids = _detailed(model, body)
    assert given == {"top": 3, "explain": True}
    assert x.dtype == np.float64 and x.shape == want_x.shape == (len(patients), len(model.encoder.names))
    np.testing.assert_array_equal(x, want_x)
    assert ids == want_ids and 7 in ids and None in ids


@pytest.mark.parametrize(
    "change",
    [
        {"ferritni": 100},  # unknown field
        {"ferritin": "high"},
        {"ferritin": True},
        {"ferritin": -5},  # out of range
        {"sodium": 500},
        {"trigger": "martian"},
        {"sex": 1},
        {"hepatomegaly": 3},
        {"hepatomegaly": 0.5},
        {"age_years": None},  # required
        {"patient_id": [1]},
        {"patient_id": "x" * 129},
        {"patient_id": 2**64},
        {"ferritin": {"value": 3, "unit": "furlongs"}},
        {"ferritin": {"value": 3}},
    ],
)
def test_anything_the_detailed_path_refuses_is_not_clean(onset, change):
    model, patients = onset
    batch = [dict(p) for p in patients]
    batch[37] |= change
    body = msgspec.json.encode({"patients": batch})
    assert model.clean.read(body, FIELDS) is None
    err = _detailed(model, body)
    assert isinstance(err, Problems) and any(p["field"].startswith("patients[37]") for p in err.problems)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"patients": []}',
        b'{"patients": {"a": 1}}',
        b'{"patients": [1, 2]}',
        b'{"top": 3}',
        b'{"patients": [{"age_years": 3, "sex": "F", "trigger": "sjia"}], "extra": 1}',
        b"[1, 2]",
        b'{"patients": [',
        b"",
        b'{"patients": [{"age_years": 1e999, "sex": "F", "trigger": "sjia"}]}',
    ],
)
def test_a_body_of_another_shape_is_not_clean(onset, raw):
    assert onset[0].clean.read(raw, FIELDS) is None


def test_unit_objects_read_to_the_detailed_paths_numbers(onset):
    """A lab system's own units, in several columns and spellings, beside plain numbers and nulls."""
    model, patients = onset
    batch = [dict(p) for p in patients]
    for i, p in enumerate(batch):
        if i % 2 and "ferritin" in p:
            p["ferritin"] = {"value": p["ferritin"] * 2.247, "unit": "pmol/L"}
        if i % 3 and "temperature_c" in p:
            p["temperature_c"] = {"value": p["temperature_c"] * 9 / 5 + 32, "unit": "°F"}
        if i % 5 == 0:
            p["hemoglobin"] = {"value": 90, "unit": "g/L"}
        if i % 7 == 0:
            p["age_years"] = {"value": 30, "unit": "months"}
    body = msgspec.json.encode({"patients": batch})
    got, want = model.clean.read(body, FIELDS), _detailed(model, body)
    assert got is not None and not isinstance(want, Problems)
    np.testing.assert_array_equal(got[1], want[0])
    split = _split(batch, ["patient_id", *model.encoder.names])
    got_split, want_split = model.clean.read_split(split), _detailed_split(model, split)
    np.testing.assert_array_equal(got_split[0], want_split[0])
    np.testing.assert_array_equal(got_split[0], want[0])


def test_a_minus_infinity_that_is_not_a_unit_marker_is_not_clean(onset):
    """-inf marks unit objects in the number block; msgspec refuses JSON numbers out of float range, so
    no real -inf arrives, and if one ever did it would be refused, not read as a unit object."""
    model, patients = onset
    clean, layout = model.clean, model.clean.records_layout
    sent = msgspec.json.encode({"patients": [{**p, "ferritin": 12345.5} for p in patients]})
    assert clean.read(sent, FIELDS) is not None  # (msgspec writes -inf as null: put it in the text)
    assert clean.read(sent.replace(b"12345.5", b"-1e999"), FIELDS) is None
    body = msgspec.json.encode({"patients": patients})
    decoded = msgspec.structs.astuple(clean.decoder(FIELDS).decode(body))[0]  # fields are f0, f1, ...
    rows = [list(msgspec.structs.astuple(p)) for p in decoded]
    assert clean.encode([tuple(r) for r in rows], layout) is not None
    rows[3][layout.places[0]] = -np.inf
    assert clean.encode([tuple(r) for r in rows], layout) is None


def test_more_column_orders_than_kept_are_all_read(onset):
    """dataframe_split decoders are kept for MAX_COLUMN_ORDERS column orders; the orders beyond are
    still read (their decoder is built for the call), to the same numbers."""
    from serve.clean_batch import MAX_COLUMN_ORDERS

    model, patients = onset
    names = ["patient_id", *model.encoder.names]
    rng = random.Random(11)
    for _ in range(MAX_COLUMN_ORDERS + 5):
        columns = rng.sample(names, len(names))
        body = _split(patients[:20], columns)
        got, want = model.clean.read_split(body), _detailed_split(model, body)
        assert got is not None
        np.testing.assert_array_equal(got[0], want[0])
    assert len(model.clean._split) == MAX_COLUMN_ORDERS


def test_random_changes_never_make_the_paths_disagree(onset):
    """400 seeded batches, each with a few values replaced by ones from a pool of the valid, the odd
    and the wrong, sent as patient objects and as a dataframe_split in a random column order: whenever
    the fast path reads a batch, the detailed path reads the same numbers; whenever the detailed path
    refuses one, the fast path has said it is not clean."""
    model, patients = onset
    names = [*model.encoder.names, "patient_id"]
    pool = [None, 0, 1, 2, -1, 0.5, 3.5, 37.2, 140, 1e6, 10**30, True, False, "F", "M", "sjia", "martian",
            "", "x" * 200, [], {}, {"value": 1, "unit": "g/L"}, {"value": 39, "unit": "degC"},
            {"value": 101, "unit": "°F"}, {"value": 5, "unit": "mmol/L"}, {"value": True, "unit": "g/L"},
            {"value": 3, "unit": "g/L", "x": 1}, {"unit": "g/L"}]  # fmt: skip
    rng = random.Random(7)
    read, refused = {"records": 0, "split": 0}, {"records": 0, "split": 0}
    for _ in range(400):
        batch = [dict(p) for p in rng.sample(patients, 40)]
        for _ in range(rng.randint(1, 3)):  # half the time another patient's value: valid, or left out
            name = rng.choice(names)
            value = rng.choice(pool) if rng.random() < 0.5 else rng.choice(patients).get(name)
            batch[rng.randrange(40)][name] = value
        body = msgspec.json.encode({"patients": batch})
        fast = model.clean.read(body, FIELDS)
        columns = rng.sample(names, rng.randint(len(names) - 3, len(names)))  # some orders leave some out
        split = _split(batch, columns + sorted({k for p in batch for k in p} - set(names)))
        for shape, got, slow in [
            ("records", fast and fast[1:], _detailed(model, body)),
            ("split", model.clean.read_split(split), _detailed_split(model, split)),
        ]:
            if isinstance(slow, Problems):
                assert got is None, (shape, slow.problems)
                refused[shape] += 1
            elif got is not None:
                np.testing.assert_array_equal(got[0], slow[0])
                assert got[1] == slow[1], shape
                read[shape] += 1
    assert min(read.values()) > 40 and min(refused.values()) > 40, (read, refused)  # both, in both shapes


def test_dataframe_split_reads_any_column_order_to_the_detailed_paths_numbers(onset):
    model, patients = onset
    columns = ["patient_id", *model.encoder.names]
    random.Random(3).shuffle(columns)
    columns.remove("ferritin")  # a column left out: missing for every patient
    body = _split(patients, columns)
    got, want = model.clean.read_split(body), _detailed_split(model, body)
    assert got is not None and not isinstance(want, Problems)
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1] == want[1] == [p.get("patient_id") for p in patients]
    assert np.isnan(got[0][:, model.encoder.names.index("ferritin")]).all()


@pytest.mark.parametrize(
    "change",
    [
        lambda f: f["columns"].append("ferritni"),  # unknown column
        lambda f: f["columns"].__setitem__(1, f["columns"][0]),  # a column twice
        lambda f: f["data"][5].append(1.0),  # a row too long
        lambda f: f["data"][5].__setitem__(0, "high"),  # a string where a number belongs
        lambda f: f.update(extra=1),
        lambda f: f.update(data=[]),
        lambda f: f.update(columns=[c for c in f["columns"] if c != "age_years"],
                           data=[r[1:] for r in f["data"]]),  # a required input left out  # fmt: skip
    ],
)
def test_a_dataframe_split_the_detailed_path_refuses_is_not_clean(onset, change):
    model, patients = onset
    columns = ["age_years", *[n for n in model.encoder.names if n != "age_years"]]
    frame = msgspec.json.decode(_split(patients, columns))["dataframe_split"]
    change(frame)
    body = msgspec.json.encode({"dataframe_split": frame})
    assert model.clean.read_split(body) is None
    assert isinstance(_detailed_split(model, body), Problems)
