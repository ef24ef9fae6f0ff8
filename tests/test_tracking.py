"""The champion alias: it moves only for a better model scored on the same held-out data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper

from masml import tracking


def _graph(scale: float) -> bytes:
    """A stand-in scoring graph: risk = scale * inputs[:, 0], margin = inputs[:, 0]."""
    col = helper.make_tensor("col", TensorProto.INT64, [1], [0])
    k = helper.make_tensor("k", TensorProto.FLOAT, [], [scale])
    nodes = [
        helper.make_node("Gather", ["inputs", "col"], ["g"], axis=1),
        helper.make_node("Flatten", ["g"], ["f"], axis=0),
        helper.make_node("Squeeze", ["f"], ["margin"]),
        helper.make_node("Mul", ["margin", "k"], ["risk"]),
    ]
    graph = helper.make_graph(
        nodes, "stand_in",
        [helper.make_tensor_value_info("inputs", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("risk", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("margin", TensorProto.FLOAT, ["N"])],
        [col, k],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    return model.SerializeToString()


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # artifacts of the default experiment land in tmp


def _register(scale: float) -> str:
    x = np.array([[0.2, 1.0], [0.4, 1.0]], np.float32)
    outputs = {"risk": x[:, 0] * scale, "margin": x[:, 0]}
    with tracking.run("masml-test", f"scale{scale}"):
        return str(tracking.log_onnx_model(_graph(scale), x, outputs, "masml-test").version)


def test_first_version_becomes_champion_then_only_a_better_one(store):
    first = _register(1.0)
    promoted, message = tracking.promote_if_better("masml-test", first, 0.7, lambda b: 0.0)
    assert promoted and "first champion" in message
    second = _register(0.5)
    seen: list[bytes] = []
    promoted, message = tracking.promote_if_better("masml-test", second, 0.6, lambda b: seen.append(b) or 0.7)
    assert not promoted and f"champion v{first} (0.7000) kept" in message
    assert seen == [_graph(1.0)]  # the champion's own graph, fetched from the registry, was scored
    promoted, message = tracking.promote_if_better("masml-test", second, 0.8, lambda b: 0.7)
    assert promoted and f"beats champion v{first}" in message


def test_a_champion_that_cannot_score_the_data_is_kept_and_the_message_says_why(store):
    first = _register(1.0)
    tracking.promote_if_better("masml-test", first, 0.7, lambda b: 0.0)
    second = _register(2.0)

    def incompatible(model_bytes: bytes) -> float:
        raise ValueError("graph takes 2 inputs, the held-out matrix has 35")

    promoted, message = tracking.promote_if_better("masml-test", second, 0.9, incompatible)
    assert not promoted
    assert "cannot score this held-out data (ValueError: graph takes 2 inputs" in message


def test_the_logged_dataset_schema_is_the_one_mlflow_would_infer(store, monkeypatch):
    """frame_schema replaces mlflow's per-value inference (which must not run); the schema a run records
    must not change."""
    import mlflow
    import pandas as pd
    from mlflow.types.utils import _infer_schema

    frame = pd.DataFrame({
        "full_float": [1.0, 2.0, 3.0, 4.0],
        "gappy_float": [1.0, np.nan, 3.0, 4.0],
        "int": np.array([1, 2, 3, 4], np.int64),
        "flag": [True, False, True, True],
        "word": pd.array(["a", "b", "c", "d"], dtype=pd.StringDtype()),
        "gappy_word": pd.array(["a", None, "c", "d"], dtype=pd.StringDtype()),
        "nan_word": pd.array(["a", "b", None, "d"], dtype=pd.StringDtype(na_value=np.nan)),
        "object_word": pd.Series(["a", None, "c", "d"], dtype=object),
    })  # fmt: skip
    expected = _infer_schema(frame).to_dict()
    assert tracking.frame_schema(frame).to_dict() == expected
    assert [c["required"] for c in expected] == [True, False, True, True, True, False, False, False]

    def slow(*_args, **_kwargs):
        raise AssertionError("mlflow's value-by-value schema inference ran")

    # mlflow swallows an inference error and logs no schema: the assertion below would then fail
    monkeypatch.setattr("mlflow.data.pandas_dataset._infer_schema", slow)
    with tracking.run("masml-test", "dataset") as active:
        tracking.log_dataset(frame, "cohort.parquet", "full_float", "training")
    run = mlflow.get_run(active.info.run_id)
    (logged,) = run.inputs.dataset_inputs
    assert logged.dataset.name == "cohort.parquet"
    assert json.loads(logged.dataset.schema)["mlflow_colspec"] == expected
