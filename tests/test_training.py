"""Training: config validation, population selection, the hold-out split, determinism and quality."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from masml.cohort import simulate
from masml.config import ConfigError, config_from_dict, load_config
from masml.encoding import encode_inputs
from masml.schema import INPUT_NAMES
from masml.summary import auroc
from masml.training import (
    STARTING_POINT,
    TrainingDataError,
    fit_logistic_baseline,
    select_population,
    split_holdout,
    tune_and_fit,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = {"n_trials": 3, "max_rounds": 150, "early_stopping_rounds": 20}


@pytest.fixture(scope="module")
def cohort():
    return simulate(4000, seed=11)


# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("task", ["onset", "icu"])
def test_shipped_yaml_files_are_the_in_code_defaults(task):
    assert load_config(CONFIGS / f"{task}.yaml") == load_config(None, task)
    assert load_config(CONFIGS / f"{task}.yaml", task) == load_config(None, task)


def test_defaults_per_task():
    onset, icu = load_config(None, "onset"), load_config(None, "icu")
    assert (onset.label, onset.population, onset.registered_model) == ("mas_onset", "all", "masml-onset")
    assert (icu.label, icu.population, icu.registered_model) == ("icu_admission", "mas_only", "masml-icu")
    assert onset.inputs == list(INPUT_NAMES)
    assert (onset.test_size, onset.folds, onset.seed, onset.min_events, onset.n_boot) == (
        0.25,
        5,
        0,
        50,
        1000,
    )


def test_yaml_overrides_only_what_it_sets(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("task: icu\nseed: 7\ncalibration: platt\ntuning:\n  n_trials: 4\n  max_depth: [2, 3]\n")
    cfg = load_config(path)
    default = load_config(None, "icu")
    assert (cfg.seed, cfg.calibration, cfg.tuning.n_trials, cfg.tuning.max_depth) == (7, "platt", 4, [2, 3])
    assert cfg.tuning.learning_rate == default.tuning.learning_rate
    assert cfg.label == default.label


def test_unknown_config_key_is_named_with_the_allowed_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task: onset\nn_trail: 200\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'n_trail'; allowed keys: \[.*'folds'.*\]"):
        load_config(path)
    with pytest.raises(
        ConfigError, match=r"unknown config key 'tuning.trials'; allowed keys: \[.*'n_trials'"
    ):
        config_from_dict({"tuning": {"trials": 5}}, "onset")


def test_unknown_input_column_is_named_with_the_valid_ones():
    with pytest.raises(
        ConfigError, match=r"'ferittin' is not a model input; valid inputs are \[.*'ferritin'"
    ):
        config_from_dict({"inputs": ["age_years", "ferittin"]}, "onset")
    with pytest.raises(ConfigError, match=r"'mas_onset' is a label, not an input"):
        config_from_dict({"inputs": ["mas_onset"]}, "icu")


@pytest.mark.parametrize(
    ("raw", "pattern"),
    [
        ({"folds": "five"}, r"'folds': value 'five' \(str\) is not an int"),
        ({"folds": True}, r"'folds': value True \(bool\) is not an int"),
        ({"test_size": 1.5}, r"'test_size': value 1.5 must lie strictly between 0 and 1"),
        ({"calibration": "beta"}, r"'calibration': value 'beta' is not one of \['isotonic', 'platt'\]"),
        ({"population": "everyone"}, r"'population': value 'everyone' is not one of"),
        ({"tuning": {"max_depth": [6, 2]}}, r"'tuning.max_depth': value \[6, 2\] has low > high"),
        ({"tuning": {"max_depth": [2.5, 4]}}, r"'tuning.max_depth': .* is not a list \[low, high\] of ints"),
        ({"tuning": {"learning_rate": [0, 0.3]}}, r"log scale, so low must be > 0"),
        ({"tuning": {"n_trials": 0}}, r"'tuning.n_trials': value 0 must be >= 1"),
        ({"thresholds": [0.2, 2]}, r"'thresholds\[1\]': value 2 must lie strictly between 0 and 1"),
        ({"label": "ferritin"}, r"'label': 'ferritin' is not a label"),
        ({"task": "icu"}, r"the file says 'icu' but 'onset' was requested"),
        ({"score_features": ["hscor"]}, r"'hscor' is not a score feature; available: \['dic_isth', "
         r"'hbd_dic', 'hlh2004', 'hscore', 'mals_ferritin', 'mas2016'\]"),
        ({"score_features": ["mas2016"], "inputs": ["temperature_c", "ferritin", "platelets", "ast"]},
         r"'mas2016' is computed from \['triglycerides', 'fibrinogen'\], which 'inputs' does not list"),
        ({"score_features": ["hscore", "hscore"]}, r"names a score more than once"),
        ({"score_features": ["hscore"], "inputs": ["ferritin", "ast"]},
         r"'hscore' is computed from \['immunosuppressed', .*which 'inputs' does not list"),
    ],
)
def test_wrong_values_name_the_key_value_and_expectation(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(raw, "onset")


@pytest.mark.parametrize("bad", [0, -1, "two", 1.5, True])
def test_parallel_trials_must_be_a_whole_number_of_at_least_one(bad):
    assert load_config(None, "onset").tuning.parallel_trials == 1  # the default: one trial at a time
    assert config_from_dict({"tuning": {"parallel_trials": 3}}, "onset").tuning.parallel_trials == 3
    key_value = rf"config key 'tuning.parallel_trials': value {bad!r} \({type(bad).__name__}\)"
    pattern = key_value + r" is not a whole number >= 1 \(how many tuning trials run at once"
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict({"tuning": {"parallel_trials": bad}}, "onset")


# --------------------------------------------------------------------------------------- population


def test_population_counts_what_it_skips(cohort):
    data = cohort.data.copy()
    mas = data["mas_onset"] == 1
    blank = data.index[mas][:25]
    data.loc[blank, "icu_admission"] = np.nan
    sub, rep = select_population(data, load_config(None, "icu"))
    assert rep.rows_in == len(data)
    assert rep.skipped_outside_population == int((~mas).sum())
    assert rep.skipped_label_missing == 25
    assert rep.rows_used == len(sub) == int(mas.sum()) - 25
    assert rep.events + rep.non_events == rep.rows_used
    assert sub["mas_onset"].eq(1).all() and sub["icu_admission"].notna().all()

    data.loc[data.index[:40], "mas_onset"] = np.nan
    sub, rep = select_population(data, load_config(None, "onset"))
    assert (rep.skipped_outside_population, rep.skipped_label_missing, rep.rows_used) == (
        0,
        40,
        len(data) - 40,
    )


def test_population_refusals_say_what_is_wrong(cohort):
    onset, icu = load_config(None, "onset"), load_config(None, "icu")
    with pytest.raises(TrainingDataError, match=r"label column 'mas_onset' is missing"):
        select_population(cohort.data.drop(columns="mas_onset"), onset)

    bad = cohort.data.copy()
    bad.loc[bad.index[:3], "mas_onset"] = 2.0
    with pytest.raises(
        TrainingDataError, match=r"'mas_onset' must hold 0/1.*3 rows hold other values, e.g. \['2.0'\]"
    ):
        select_population(bad, onset)

    no_mas = cohort.data.assign(mas_onset=0.0, icu_admission=np.nan)
    with pytest.raises(TrainingDataError, match=r"population is empty: of 4000 rows, 4000 are outside"):
        select_population(no_mas, icu)

    few = cohort.data.copy()
    events = few.index[few["icu_admission"] == 1]
    few.loc[events[12:], "icu_admission"] = 0.0
    with pytest.raises(
        TrainingDataError, match=r"too few events \(label == 1\).*found 12 among \d+ rows, need at least 50"
    ):
        select_population(few, icu)


# -------------------------------------------------------------------------------------------- split


def test_split_is_stratified_disjoint_grouped_and_deterministic():
    rng = np.random.default_rng(0)
    n = 3000
    y = (rng.random(n) < 0.3).astype(int)
    groups = np.array([f"P{i}" for i in range(n)], dtype=object)
    groups[1::7] = groups[0::7][: len(groups[1::7])]  # every 7th patient is seen twice
    tr, te = split_holdout(y, groups, 0.25, seed=3)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == n
    assert set(groups[tr]).isdisjoint(set(groups[te]))
    assert abs(len(te) / n - 0.25) < 0.01
    assert abs(y[te].mean() - y.mean()) < 0.01 and abs(y[tr].mean() - y.mean()) < 0.01
    tr2, te2 = split_holdout(y, groups, 0.25, seed=3)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    _, te3 = split_holdout(y, groups, 0.25, seed=4)
    assert not np.array_equal(te, te3)
    # the test set depends on the patients, not on the row order
    perm = rng.permutation(n)
    _, te_perm = split_holdout(y[perm], groups[perm], 0.25, seed=3)
    assert set(groups[perm][te_perm]) == set(groups[te])


# ------------------------------------------------------------------------------ fitting, determinism


def _fit(cohort, task, tuning, **overrides):
    cfg = config_from_dict({"tuning": tuning, **overrides}, task)
    sub, _ = select_population(cohort.data, cfg)
    x = encode_inputs(sub, cfg.inputs)
    y = sub[cfg.label].to_numpy().astype(int)
    return tune_and_fit(x, y, sub["patient_id"].to_numpy(), cfg.inputs, cfg), x, y, cfg


def test_same_data_config_and_seed_give_the_same_model(cohort):
    a, x, y, cfg = _fit(cohort, "icu", TINY)
    b, _, _, _ = _fit(cohort, "icu", TINY)
    assert a.booster.save_raw("json") == b.booster.save_raw("json")
    assert np.array_equal(a.predict_risk(x), b.predict_risk(x))
    assert a.trials == b.trials and a.calibrator == b.calibrator
    # the record of the search
    assert [t["number"] for t in a.trials] == [0, 1, 2] and not a.stopped_by_timeout
    assert a.trials[0]["params"] == STARTING_POINT
    assert a.cv_logloss == min(t["value"] for t in a.trials)
    assert a.n_rounds == round(np.mean(a.fold_best_rounds)) and a.booster.num_boosted_rounds() == a.n_rounds
    assert a.oof_margin.shape == a.oof_risk.shape == y.shape and np.isfinite(a.oof_margin).all()
    assert a.feature_names == a.booster.feature_names
    margin = a.predict_margin(x)
    assert margin.dtype == np.float32 and np.array_equal(a.calibrator.apply(margin), a.predict_risk(x))
    # another seed is another model
    c, _, _, _ = _fit(cohort, "icu", TINY, seed=1)
    assert c.booster.save_raw("json") != a.booster.save_raw("json")


def test_a_search_cut_short_by_the_timeout_keeps_its_first_trial_and_says_so(cohort):
    """``timeout_s`` is a safety cap checked between batches: the first batch always runs (a cap too small
    for one trial used to leave no trial, and no model), and a cut-short search is flagged so that the
    pipelines can say the model depends on the machine's speed."""
    from masml.training import timeout_warning

    cut, x, _, cfg = _fit(cohort, "icu", TINY | {"timeout_s": 1e-9})
    assert [t["number"] for t in cut.trials] == [0] and cut.stopped_by_timeout
    assert np.isfinite(cut.predict_risk(x)).all()
    note = timeout_warning("icu", cut, cfg.tuning)
    assert note is not None and "after 1 of 3 trials" in note and "tuning.timeout_s: null" in note
    full, _, _, cfg = _fit(cohort, "icu", TINY)
    assert timeout_warning("icu", full, cfg.tuning) is None


def test_the_search_asks_trials_in_batches_and_depends_only_on_seed_and_batch_size():
    from masml.training import search

    def loss(params):
        return (np.log(params["learning_rate"]) + 3) ** 2 + params["max_depth"] / 10 + params["gamma"]

    def run(n_trials, parallel):
        cfg = config_from_dict({"tuning": {"n_trials": n_trials, "parallel_trials": parallel}}, "onset")
        batches = []

        def run_batch(asked):  # what the cluster engine gives: a batch in, its losses out in trial order
            batches.append([number for number, _ in asked])
            return [loss(params) for _, params in asked]

        study = search(lambda number, params: loss(params), cfg, run_batch)
        return batches, [(t.number, t.params, t.value) for t in study.trials]

    batches, trials = run(5, 2)
    assert batches == [[0, 1], [2, 3], [4]]  # the whole budget, the last batch what remains
    assert trials[0][1] == STARTING_POINT and [t[0] for t in trials] == [0, 1, 2, 3, 4]
    assert run(5, 2) == (batches, trials)  # the same seed and batch size: the same trials
    # TPE's first 10 trials are random whatever the batch size; then a batch is proposed blind: trial 11
    # is chosen with trial 10 still pending (a "constant liar"), not knowing its loss
    sequential, batched = run(12, 1), run(12, 2)
    assert sequential[0] == [[n] for n in range(12)] and batched[0][-1] == [10, 11]
    assert [t[1] for t in batched[1][:11]] == [t[1] for t in sequential[1][:11]]
    assert batched[1][11][1] != sequential[1][11][1]
    # ... and with the constant liar on: trial 11 is what a TPE sampler with constant_liar=True proposes
    # when trial 10 is pending (optuna's default ignores pending trials, and a batch could bunch up)
    import optuna

    from masml.training import _suggest

    liar = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, constant_liar=True))
    liar.enqueue_trial(STARTING_POINT)
    bounds = config_from_dict({}, "onset").tuning.bounds()
    for first in range(0, 12, 2):
        asked = [liar.ask(), liar.ask()]
        params = [_suggest(t, bounds) for t in asked]
        for t, p in zip(asked, params, strict=True):
            liar.tell(t, loss(p))
        assert params == [t[1] for t in batched[1][first : first + 2]], first
    cfg = config_from_dict({"tuning": {"n_trials": 12}}, "onset")  # no run_batch: one after another
    assert [(t.number, t.params, t.value) for t in search(lambda n, p: loss(p), cfg).trials] == sequential[1]


def test_onset_model_is_close_to_the_ceiling_and_calibrated():
    cohort = simulate(8000, seed=5)
    cfg = config_from_dict({"tuning": {"n_trials": 4, "max_rounds": 400}}, "onset")
    sub, _ = select_population(cohort.data, cfg)
    truth = cohort.truth.set_index("patient_id").loc[sub["patient_id"], "true_p_mas_onset"].to_numpy()
    x = encode_inputs(sub, cfg.inputs)
    y = sub[cfg.label].to_numpy().astype(int)
    groups = sub["patient_id"].to_numpy()
    tr, te = split_holdout(y, groups, cfg.test_size, cfg.seed)
    model = tune_and_fit(x[tr], y[tr], groups[tr], cfg.inputs, cfg)
    risk = model.predict_risk(x[te])
    ceiling = auroc(y[te], truth[te])
    assert auroc(y[te], risk) > ceiling - 0.03
    assert abs(risk.mean() - y[te].mean()) < 0.02
    assert abs(model.oof_risk.mean() - y[tr].mean()) < 0.005  # isotonic on OOF margins preserves the mean
    baseline = fit_logistic_baseline(x[tr], y[tr], cfg.inputs, cfg.seed)
    assert ceiling - 0.10 < auroc(y[te], baseline.predict_risk(x[te])) < ceiling


def test_fit_refuses_mismatched_shapes(cohort):
    x = encode_inputs(cohort.data, INPUT_NAMES)
    y = cohort.data["mas_onset"].to_numpy()
    with pytest.raises(ValueError, match=r"input names"):
        tune_and_fit(x[:, :5], y, cohort.data["patient_id"], INPUT_NAMES, load_config(None, "onset"))
    with pytest.raises(TrainingDataError, match=r"only 0 and 1"):
        tune_and_fit(
            x,
            pd.Series(y).replace(0, 2).to_numpy(),
            cohort.data["patient_id"],
            INPUT_NAMES,
            load_config(None, "onset"),
        )


def test_feature_builder_is_an_sklearn_transformer():
    from sklearn.base import clone
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    from masml.cohort import simulate
    from masml.encoding import encode_inputs
    from masml.features import FeatureBuilder, feature_spec, transform
    from masml.schema import INPUT_NAMES

    names = tuple(INPUT_NAMES)
    x = encode_inputs(simulate(300, seed=5).data, names)
    builder = FeatureBuilder(input_names=names, score_features=("hscore",))
    pipe = make_pipeline(clone(builder), FunctionTransformer())
    out = pipe.fit_transform(x)
    np.testing.assert_array_equal(out, transform(x, feature_spec(names, ["hscore"])))
    out_names = list(pipe[0].get_feature_names_out())
    assert out_names[-1] == "hscore" and "ferritin_esr_ratio" in out_names and len(out_names) == out.shape[1]
    with pytest.raises(ValueError, match=r"expects an input matrix \[N, 35\].*got shape \(300, 3\)"):
        pipe.transform(x[:, :3])


def test_logistic_baseline_sample_is_all_rows_up_to_the_cap_then_a_seeded_sample():
    from masml.training import BASELINE_ROWS, baseline_sample

    few = np.arange(0, 2 * 5_000, 2)
    assert baseline_sample(few, seed=0) is few
    many = np.arange(3, 3 + 3 * (BASELINE_ROWS + 5_000), 3)
    got = baseline_sample(many, seed=4)
    assert len(got) == BASELINE_ROWS and len(np.unique(got)) == BASELINE_ROWS
    assert np.isin(got, many).all() and (np.diff(got) > 0).all()
    np.testing.assert_array_equal(baseline_sample(many, seed=4), got)
    assert not np.array_equal(baseline_sample(many, seed=5), got)
