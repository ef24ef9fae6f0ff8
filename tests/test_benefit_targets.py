"""Issue 4's targets, measured as the main job measures them: the default cohort (20,000 patients,
seed 0), the shipped config, the held-out MAS patients, against the simulator's true benefit."""

from __future__ import annotations

from pathlib import Path

import pytest

from masml.cohort import simulate, write_cohort
from pipelines.il1_benefit import run_il1_benefit_pipeline

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "il1_benefit.yaml"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("benefit_targets")
    data, _ = write_cohort(simulate(20_000, seed=0), tmp / "cohort.parquet")
    result = run_il1_benefit_pipeline(
        data, tmp / "bundle", config_path=CONFIG, log=lambda m: None, track=False
    )
    return result.report


def test_pehe_is_at_most_six_tenths_of_the_average_effects(report):
    truth = report["truth"]
    assert truth["pehe_ratio"] <= 0.6, truth["pehe_ratio"]
    assert truth["pehe"] == pytest.approx(truth["pehe_ratio"] * truth["pehe_constant_true_mean"])


def test_policy_is_within_one_death_per_100_of_the_best_and_beats_treating_all(report):
    deaths = report["truth"]["deaths_per_100"]
    assert deaths["model"] - deaths["true_benefit"] <= 1.0, deaths
    assert deaths["model"] < deaths["treat_all"], deaths
