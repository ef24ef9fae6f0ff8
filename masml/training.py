"""Training of the risk models (MAS onset, ICU need): population, hold-out split, tuning, calibration.

The path from data to a model, and why each step is what it is:

1. ``select_population`` keeps the rows the task is defined on (onset: every patient with the label;
   ICU: MAS patients with the label) and counts what it skips, so nothing vanishes silently.
2. ``split_holdout`` sets aside a test set, stratified by the label and grouped by ``patient_id`` (a
   patient seen twice must never be on both sides, or the test measures memory, not prediction).
3. ``tune_and_fit`` searches xgboost's hyper-parameters with a seeded TPE sampler under a fixed number
   of trials, each scored by stratified-grouped K-fold cross-validated log loss with early stopping.
   With the best parameters, the K fold models' out-of-fold margins train the calibrator (so it learns
   how scores behave on unseen patients), and one final booster is fitted on all training rows with the
   mean of the folds' best round counts.
4. ``fit_logistic_baseline`` is a plain logistic regression on the same features: evaluated beside the
   booster to show what the booster adds, never exported.

Determinism: every source of randomness takes ``config.seed`` (split, folds, sampler, xgboost), xgboost
runs with ``tree_method="hist"`` and a fixed thread count, and trials run one after the other. The same
data, config and seed therefore give byte-identical boosters, *unless* the ``tuning.timeout_s`` safety
cap stops the search early: then the number of trials depends on the machine's speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from masml import features
from masml.calibration import Calibrator, fit_calibrator
from masml.config import INT_PARAMS, LOG_SCALE, SEARCH_SPACE, Config, TuningConfig

# Fixed, not tuned: one thread count for every run (xgboost's hist results are reproducible for a given
# thread count; changing it could change the model), and the histogram method.
NTHREAD = 2
TREE_METHOD = "hist"

# The first trial of every search: a plain, known-good setting (design notes: depth 4, a small learning
# rate), clipped into the configured bounds, so that even a tiny budget starts from something sensible.
STARTING_POINT = {
    "max_depth": 4,
    "learning_rate": 0.05,
    "min_child_weight": 1.0,
    "subsample": 0.8,
    "colsample_bytree": 0.8,
    "reg_lambda": 1.0,
    "reg_alpha": 0.001,
    "gamma": 0.0,
}


class TrainingDataError(ValueError):
    """The data cannot train the requested model; the message says what was found and what is needed."""


# --------------------------------------------------------------------------------------------------
# 1. Population
# --------------------------------------------------------------------------------------------------


@dataclass
class PopulationReport:
    """What ``select_population`` kept and skipped, and why."""

    task: str
    label: str
    population: str
    rows_in: int
    skipped_outside_population: int  # e.g. mas_onset != 1 for the ICU model
    skipped_label_missing: int  # inside the population but the label is empty
    rows_used: int
    events: int
    non_events: int

    @property
    def prevalence(self) -> float:
        return self.events / self.rows_used if self.rows_used else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "prevalence": self.prevalence}


def _binary(frame: pd.DataFrame, column: str) -> pd.Series:
    """The column as floats 0/1/NaN; refuses anything else, with examples."""
    raw = frame[column]
    values = pd.to_numeric(raw, errors="coerce")
    bad = (values.isna() & raw.notna()) | (values.notna() & ~values.isin([0, 1]))
    if bad.any():
        examples = sorted({str(v) for v in raw[bad]})[:5]
        raise TrainingDataError(
            f"label column {column!r} must hold 0/1 (or be empty); {int(bad.sum())} rows hold other values, "
            f"e.g. {examples}"
        )
    return values.astype(float)


def population_rows(frame: pd.DataFrame, config: Config) -> tuple[pd.Series, dict[str, int]]:
    """Which rows the task is defined on with the label present, and the counts of what was skipped.

    Split from ``select_population`` so that a cluster can run it on each partition and add up the
    counts. Refuses a missing label column and label values other than 0/1.
    """
    label = config.label
    if label not in frame.columns:
        raise TrainingDataError(f"the label column {label!r} is missing from the data (task {config.task!r})")
    y = _binary(frame, label)
    if config.population == "all":
        inside = pd.Series(True, index=frame.index)
    elif config.population == "mas_only":
        if "mas_onset" not in frame.columns:
            raise TrainingDataError(
                "population 'mas_only' needs the column 'mas_onset' to find MAS patients; it is missing"
            )
        inside = _binary(frame, "mas_onset") == 1
    else:  # config validation rejects this already
        raise TrainingDataError(f"unknown population {config.population!r}")
    has_label = y.notna()
    keep = inside & has_label
    counts = {
        "rows_in": len(frame),
        "skipped_outside_population": int((~inside).sum()),
        "skipped_label_missing": int((inside & ~has_label).sum()),
        "rows_used": int(keep.sum()),
        "events": int((y[keep] == 1).sum()),
        "non_events": int((y[keep] == 0).sum()),
    }
    return keep, counts


def population_report(config: Config, counts: dict[str, int]) -> PopulationReport:
    """The report of ``population_rows``' counts (summed over partitions, on a cluster); refuses an empty
    population and fewer than ``config.min_events`` rows of either class."""
    report = PopulationReport(task=config.task, label=config.label, population=config.population, **counts)
    if report.rows_used == 0:
        raise TrainingDataError(
            f"the population is empty: of {report.rows_in} rows, {report.skipped_outside_population} are "
            f"outside population {config.population!r} and {report.skipped_label_missing} have no "
            f"{config.label!r} value"
        )
    for what, count in (
        ("events (label == 1)", report.events),
        ("non-events (label == 0)", report.non_events),
    ):
        if count < config.min_events:
            raise TrainingDataError(
                f"too few {what} to train the {config.task!r} model: found {count} among "
                f"{report.rows_used} rows, need at least {config.min_events} (config 'min_events')"
            )
    return report


def select_population(frame: pd.DataFrame, config: Config) -> tuple[pd.DataFrame, PopulationReport]:
    """Rows the task is defined on, with the label present; skipped rows are counted in the report.

    Refuses (``TrainingDataError``) a missing label column, label values other than 0/1, an empty
    population, and fewer than ``config.min_events`` rows of either class.
    """
    keep, counts = population_rows(frame, config)
    report = population_report(config, counts)
    return frame.loc[keep].reset_index(drop=True), report


# --------------------------------------------------------------------------------------------------
# 2. Hold-out split and CV folds
# --------------------------------------------------------------------------------------------------


def split_holdout(
    y: np.ndarray, groups: Sequence, test_size: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic hold-out split, grouped by patient and stratified by the label.

    Each patient (group) is put in a stratum by whether any of its rows is an event; within each stratum
    the patients are shuffled with ``seed`` and taken into the test set until it holds ``test_size`` of
    the stratum's rows. Every row of a patient lands on the same side; the result depends only on the
    set of (group, label) pairs, not on row order. Returns sorted row indices (train, test).
    """
    y = np.asarray(y)
    groups = np.asarray(groups)
    if len(y) != len(groups):
        raise ValueError(f"y has {len(y)} rows but groups has {len(groups)}")
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must lie strictly between 0 and 1, got {test_size}")
    uniq, inverse = np.unique(groups, return_inverse=True)
    group_event = np.zeros(len(uniq), dtype=bool)
    np.logical_or.at(group_event, inverse, y == 1)
    group_rows = np.bincount(inverse, minlength=len(uniq))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    in_test = np.zeros(len(uniq), dtype=bool)
    for stratum in (False, True):
        members = order[group_event[order] == stratum]
        if len(members) == 0:
            continue
        target = test_size * group_rows[members].sum()
        cum = np.cumsum(group_rows[members])
        take = int(np.searchsorted(cum, target, side="left")) + 1  # smallest prefix reaching the target
        take = min(max(take, 1), len(members) - 1) if len(members) > 1 else 0
        in_test[members[:take]] = True
    test_row = in_test[inverse]
    train_idx, test_idx = np.flatnonzero(~test_row), np.flatnonzero(test_row)
    if len(test_idx) == 0 or len(train_idx) == 0:
        raise ValueError(f"cannot split {len(uniq)} patients into train and test with test_size={test_size}")
    return train_idx, test_idx


def cv_folds(y: np.ndarray, groups: Sequence, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, patient-grouped K-fold splits (sklearn ``StratifiedGroupKFold``, shuffled with seed)."""
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(y).astype(int)
    n_min = int(min((y == 1).sum(), (y == 0).sum()))
    if n_min < folds:
        raise TrainingDataError(
            f"{folds}-fold cross-validation needs >= {folds} rows of each class, found {n_min}"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(tr, va) for tr, va in splitter.split(np.zeros(len(y)), y, np.asarray(groups))]


# --------------------------------------------------------------------------------------------------
# 3. Tuning, calibration, final fit
# --------------------------------------------------------------------------------------------------


def booster_params(params: dict[str, Any], seed: int) -> dict[str, Any]:
    """Full xgboost parameters: the tuned ones plus everything fixed for reproducibility."""
    return {
        "objective": "binary:logistic",
        "eval_metric": "logloss",
        "tree_method": TREE_METHOD,
        "nthread": NTHREAD,
        "seed": seed,
        "verbosity": 0,
        **params,
    }


@dataclass
class TrainedRiskModel:
    """A tuned, calibrated risk model and the record of how it was found."""

    booster: Any  # xgboost.Booster
    spec: list[features.Feature]
    input_names: list[str]
    feature_names: list[str]
    calibrator: Calibrator
    best_params: dict[str, Any]
    n_rounds: int
    oof_margin: np.ndarray  # out-of-fold margins of the training rows (cross-fitted, best params)
    oof_risk: np.ndarray  # the calibrator applied to them
    cv_logloss: float  # mean CV log loss of the best trial
    trials: list[dict[str, Any]]  # number, params, value (mean CV log loss), n_rounds
    seed: int = 0
    stopped_by_timeout: bool = False  # True: fewer trials than n_trials ran (not reproducible)
    fit_seconds: float = 0.0
    fold_best_rounds: list[int] = field(default_factory=list)
    # On a cluster only: the best trial's booster of each fold (fold k's never saw fold k's rows), so
    # that the benefit model can cross-fit predictions where the rows lie (masml.distributed.benefit).
    fold_boosters: list[Any] = field(default_factory=list)

    @property
    def xgb_params(self) -> dict[str, Any]:
        return booster_params(self.best_params, self.seed)

    def features(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(self.input_names):
            raise ValueError(f"expected an input matrix [N, {len(self.input_names)}], got shape {x.shape}")
        return features.transform(x, self.spec)

    def predict_margin(self, x: np.ndarray) -> np.ndarray:
        """Input matrix -> xgboost log-odds before calibration (float32 [N])."""
        return self.booster.inplace_predict(self.features(x), predict_type="margin")

    def predict_risk(self, x: np.ndarray) -> np.ndarray:
        """Input matrix -> calibrated probability (float64 [N])."""
        return self.calibrator.apply(self.predict_margin(x))


def _suggest(trial, bounds: dict[str, list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in SEARCH_SPACE:
        low, high = bounds[name]
        if name in INT_PARAMS:
            out[name] = trial.suggest_int(name, int(low), int(high))
        else:
            out[name] = trial.suggest_float(name, float(low), float(high), log=name in LOG_SCALE)
    return out


def _starting_point(bounds: dict[str, list[float]]) -> dict[str, Any]:
    return {
        name: type(v)(min(max(v, bounds[name][0]), bounds[name][1])) for name, v in STARTING_POINT.items()
    }


def search(
    objective: Callable[[int, dict[str, Any]], float],
    config: Config,
    run_batch: Callable[[list[tuple[int, dict[str, Any]]]], list[float]] | None = None,
):
    """The hyper-parameter search both engines share: a seeded TPE sampler, the known-good starting
    point as trial 0, then ``config.tuning.n_trials`` trials in all (fewer only if the ``timeout_s``
    cap stops it). ``objective(trial_number, params)`` returns the mean CV log loss; the optuna study
    is returned.

    Trials are asked in batches of ``tuning.parallel_trials`` (N): every trial of a batch is proposed
    before any of them is evaluated (the TPE sampler's "constant liar" counts the pending ones as bad
    results, so a batch spreads out), and the losses are told in trial-number order once the whole
    batch is done.
    The trials therefore depend only on the seed and N, never on which one finishes first; N = 1 is
    the classic one-at-a-time search. ``run_batch([(number, params), ...])`` evaluates a batch and
    returns its losses in the same order (the cluster engine runs them at once); without it the batch
    runs one trial after another through ``objective``. ``timeout_s`` is checked between batches."""
    import optuna

    tuning = config.tuning
    bounds = tuning.bounds()
    if run_batch is None:
        run_batch = lambda asked: [objective(number, params) for number, params in asked]  # noqa: E731
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        # constant_liar: a batch's pending trials count as bad results, so its trials spread out (off
        # by default in optuna, where pending trials are ignored and a batch may bunch up); N = 1 never
        # has a pending trial, so the one-at-a-time search is unchanged
        sampler = optuna.samplers.TPESampler(seed=config.seed, constant_liar=tuning.parallel_trials > 1)
        study = optuna.create_study(direction="minimize", sampler=sampler)
        study.enqueue_trial(_starting_point(bounds))
        started, done = time.perf_counter(), 0
        while done < tuning.n_trials:
            # checked between batches, never before the first: a cap so small that no trial ran would
            # leave no model at all
            if done and tuning.timeout_s is not None and time.perf_counter() - started >= tuning.timeout_s:
                break
            trials, asked = [], []
            for _ in range(min(tuning.parallel_trials, tuning.n_trials - done)):
                trial = study.ask()  # suggested before the next ask: the sampler sees it as pending
                trials.append(trial)
                asked.append((trial.number, _suggest(trial, bounds)))
            losses = run_batch(asked)
            if len(losses) != len(trials):
                raise RuntimeError(f"a batch of {len(trials)} trials returned {len(losses)} losses")
            for trial, loss in zip(trials, losses, strict=True):
                study.tell(trial, float(loss))
            done += len(trials)
    finally:
        optuna.logging.set_verbosity(previous)
    return study


def _cross_validate(
    folds: list[tuple[Any, Any, np.ndarray, np.ndarray]],
    f: np.ndarray,
    params: dict[str, Any],
    config: Config,
) -> tuple[float, np.ndarray, list[int]]:
    """Mean fold log loss at each fold's best round, out-of-fold margins, and the best round counts."""
    import xgboost as xgb

    tuning = config.tuning
    oof = np.full(f.shape[0], np.nan, dtype=np.float64)
    losses, rounds = [], []
    for dtrain, dvalid, _, va in folds:
        booster = xgb.train(
            booster_params(params, config.seed),
            dtrain,
            num_boost_round=tuning.max_rounds,
            evals=[(dvalid, "valid")],
            early_stopping_rounds=tuning.early_stopping_rounds,
            verbose_eval=False,
        )
        best = int(booster.best_iteration)
        losses.append(float(booster.best_score))
        rounds.append(best + 1)
        oof[va] = booster.inplace_predict(f[va], predict_type="margin", iteration_range=(0, best + 1))
    return float(np.mean(losses)), oof, rounds


def tune_and_fit(
    x: np.ndarray,
    y: np.ndarray,
    groups: Sequence,
    input_names: Sequence[str],
    config: Config,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
) -> TrainedRiskModel:
    """Tune xgboost on ``x`` (the float32 input matrix) by CV log loss, calibrate out of fold, refit.

    ``on_trial`` (optional) is called with each finished trial's record, for progress output.
    """
    import xgboost as xgb

    started = time.perf_counter()
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y).astype(np.float64)
    input_names = list(input_names)
    if x.ndim != 2 or x.shape[1] != len(input_names):
        raise ValueError(f"x has shape {x.shape} but {len(input_names)} input names were given")
    if len(y) != x.shape[0] or len(groups) != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows, y {len(y)}, groups {len(groups)}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise TrainingDataError("y must hold only 0 and 1 (select_population removes missing labels)")
    spec = features.feature_spec(input_names, config.score_features)
    names = features.feature_names(spec)
    f = features.transform(x, spec)

    # Fold matrices are built once and reused by every trial. They carry no feature names: xgboost 3.2
    # re-checks names on every evaluation round, which made tuning ~10x slower (measured).
    folds = []
    for tr, va in cv_folds(y, groups, config.folds, config.seed):
        dtrain = xgb.QuantileDMatrix(f[tr], label=y[tr], nthread=NTHREAD)
        dvalid = xgb.DMatrix(f[va], label=y[va], nthread=NTHREAD)
        folds.append((dtrain, dvalid, tr, va))

    results: dict[int, tuple[np.ndarray, list[int]]] = {}
    records: list[dict[str, Any]] = []

    def objective(number: int, params: dict[str, Any]) -> float:
        loss, oof, rounds = _cross_validate(folds, f, params, config)
        results[number] = (oof, rounds)
        record = {"number": number, "params": params, "value": loss, "n_rounds": int(np.mean(rounds))}
        records.append(record)
        if on_trial is not None:
            on_trial(record)
        return loss

    study = search(objective, config)

    best = study.best_trial
    best_params = {name: best.params[name] for name in SEARCH_SPACE}
    oof_margin, fold_rounds = results[best.number]
    calibrator = fit_calibrator(oof_margin, y, config.calibration)
    n_rounds = max(1, int(round(float(np.mean(fold_rounds)))))
    dall = xgb.QuantileDMatrix(f, label=y, feature_names=names, nthread=NTHREAD)
    booster = xgb.train(booster_params(best_params, config.seed), dall, num_boost_round=n_rounds)
    return TrainedRiskModel(
        booster=booster,
        spec=spec,
        input_names=input_names,
        feature_names=names,
        calibrator=calibrator,
        best_params=best_params,
        n_rounds=n_rounds,
        oof_margin=oof_margin,
        oof_risk=calibrator.apply(oof_margin),
        cv_logloss=float(best.value),
        trials=records,
        seed=config.seed,
        stopped_by_timeout=len(records) < config.tuning.n_trials,
        fit_seconds=time.perf_counter() - started,
        fold_best_rounds=list(fold_rounds),
    )


def timeout_warning(what: str, model: TrainedRiskModel, tuning: TuningConfig) -> str | None:
    """The line to show when ``tuning.timeout_s`` stopped the search before ``n_trials``, else None.

    Why say it aloud (and tag the run, and write it in the card): the cap makes the number of trials,
    and so the model, depend on the machine's speed, which breaks "same data, config and seed, same
    model". At 5M patients on the 2-worker bench cluster one 3-fold trial took 896-900+ s against the
    default cap of 900 s, so identical runs tuned one trial or two (1,389 against 2,156-2,246 s)."""
    if not model.stopped_by_timeout:
        return None
    return (
        f"WARNING: {what}: tuning.timeout_s ({tuning.timeout_s:g} s) stopped the search after "
        f"{len(model.trials)} of {tuning.n_trials} trials, so this model depends on this machine's speed "
        "and another run may differ; set tuning.timeout_s: null (or higher) to make n_trials binding"
    )


@dataclass
class RiskTraining:
    """A trained risk model and what its evaluation needs of the data, whichever engine trained it.

    The single-process path and the cluster path (``masml.distributed.train``) both end here, so that
    evaluation, export, tracking and the card are one code path. Nothing in it is data-sized except
    ``held_out`` (a few columns per held-out patient) and ``x_check`` (input rows for the parity gate,
    SHAP and the champion comparison: all held-out rows on one process, a seeded sample on a cluster).
    """

    model: TrainedRiskModel
    population: PopulationReport
    # y, trigger, age_years, sex, score.*, hscore_probability, risk, baseline[, ceiling]
    held_out: pd.DataFrame
    x_check: np.ndarray
    y_check: np.ndarray
    train_description: dict  # masml.card.data_description of the training rows
    test_description: dict
    training_data: dict  # the manifest's training_data section
    split: str  # how the held-out set was drawn, in words (for the card)
    log_dataset: Callable[[], None]  # logs the training data as an MLflow dataset input


# --------------------------------------------------------------------------------------------------
# 4. The logistic baseline (evaluated, never exported)
# --------------------------------------------------------------------------------------------------


# Training rows the logistic baseline is fitted on, at most: a seeded sample beyond that, on one process
# and on a cluster alike. Why: a logistic regression's ~100 coefficients are settled long before 100,000
# rows, while sklearn's imputer, indicators and scaler copy the matrix in float64 (750,000 rows: 14 s and
# +1.0 GB; 100,000: ~2 s, ~0.14 GB). Assumption: a yardstick, not a model anyone deploys.
BASELINE_ROWS = 100_000


def baseline_sample(train_idx: np.ndarray, seed: int) -> np.ndarray:
    """The training rows (sorted) the one-process logistic baseline sees: all of them up to
    ``BASELINE_ROWS``, else a seeded sample of that many."""
    if len(train_idx) <= BASELINE_ROWS:
        return train_idx
    return np.sort(np.random.default_rng(seed).choice(train_idx, BASELINE_ROWS, replace=False))


@dataclass
class LogisticBaseline:
    """Logistic regression on the booster's features (an sklearn pipeline: derived features, median
    imputation with missing-value indicators, standard scaling). A simple yardstick for what the booster
    adds; it is never exported."""

    pipeline: Any
    input_names: list[str]

    def predict_risk(self, x: np.ndarray) -> np.ndarray:
        return self.pipeline.predict_proba(np.asarray(x, dtype=np.float32))[:, 1]


def fit_logistic_baseline(
    x: np.ndarray,
    y: np.ndarray,
    input_names: Sequence[str],
    seed: int = 0,
    score_features: Sequence[str] = (),
) -> LogisticBaseline:
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipeline = make_pipeline(
        features.FeatureBuilder(input_names=tuple(input_names), score_features=tuple(score_features)),
        SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True),
        StandardScaler(),
        LogisticRegression(max_iter=5000, random_state=seed),
    )
    pipeline.fit(np.asarray(x, dtype=np.float32), np.asarray(y).astype(int))
    return LogisticBaseline(pipeline=pipeline, input_names=list(input_names))
