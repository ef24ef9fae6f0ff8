"""The IL-1 blockade benefit model trained on a Dask cluster: the same population, nuisance models,
pseudo-outcomes, learners, selection rule and final stage as one process (``pipelines.il1_benefit``,
``masml.causal``), with the rows left on the workers.

What each step does on the cluster, and where it differs from one process:

* Validation, population, the treatment filter, features and the held-out columns run on each
  partition where it lies; only counts and per-patient numbers come back (as for the risk models,
  ``masml.distributed.train``).
* Split and folds: a seeded hash of ``patient_id`` (grouped exactly, stratified only in expectation;
  one process stratifies the split by treatment exactly), so the two engines hold out different
  patients and their figures differ by sampling noise.
* The three nuisance models (death if untreated, death if treated, propensity) are the risk pipeline's
  cluster training (``_tune_and_fit``: tuned, early-stopped ``xgboost.dask`` folds, calibrated on
  out-of-fold margins), each on its own rows. Their cross-fitted predictions are computed on the workers
  with each fold's booster on the fold it never saw, as one process does.
* The learners' out-of-fold benefits: the constant and the ridge stage from sums that add up over
  partitions (phi, Z'Z, Z'phi per fold), the forests (DR-learner and both X-learner stages) with
  ``xgboost.dask`` per fold, on the training rows laid out by position like the nuisances'. The
  per-patient out-of-fold benefits come back and the one-standard-error rule picks the learner with the
  same code as one process (``causal.choose_learner``).
* The chosen final stage is refitted the same way on every training patient.
* Held-out diagnostics need per-patient numbers only (outputs, outcome, treatment, trigger, guardrail
  status, truth); the graph's and explainer's gates and the champion score use a seeded sample of at most
  ``CHECK_ROWS`` held-out input rows, and the balance table a seeded sample of at most ``BASELINE_ROWS``
  training patients (every patient below those sizes).

Reproducibility: as for the risk models, the same data, partitions, config, seed and number of workers
give the same model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from masml import causal, features, guardrails
from masml.config import Config
from masml.distributed.cluster import COLLECTIVE_TIMEOUT_S, guarded, threads_per_worker, worker_addresses
from masml.distributed.data import Piece, load_partitioned, read_piece
from masml.distributed.train import (
    BASELINE_ROWS,
    CHECK_ROWS,
    FOLD_SALT,
    SAMPLE_SALT,
    SPLIT_SALT,
    _descriptions,
    _pinned,
    _tune_and_fit,
    cluster_record,
    fingerprint_on_cluster,
    patient_uniform,
    truth_pieces,
    worker_groups,
)
from masml.encoding import encode_inputs
from masml.training import TrainingDataError, population_report, population_rows

TRUTH_COLUMNS = ("true_benefit", "true_p_death_untreated", "true_p_death_treated", "true_propensity_il1")
NUISANCES = ("untreated", "treated", "propensity")
FORESTS = ("dr", "x0", "x1")  # DR-learner; X-learner on untreated (y - mu1) and treated (mu0 - y) patients
ALL = -1  # "fold" of the final stage: every training patient
STATUS = "guardrail:"  # held-out column prefix of a guardrail's status


def _prepare(frame: pd.DataFrame, truth: Piece | None, config: Config, spec: list, names: list[str]) -> dict:
    """Runs on a worker: population, treatment, split, folds, inputs and features of one partition."""
    keep, counts = population_rows(frame, config)
    pop = frame.loc[keep].reset_index(drop=True)
    t = causal.treatment_values(pop)
    known = ~np.isnan(t)
    counts["skipped_treatment"] = int((~known).sum())
    positions = np.flatnonzero(keep.to_numpy())[known]  # rows of the partition the model uses
    pop, t = pop.loc[known].reset_index(drop=True), t[known]
    ids = pop["patient_id"].astype(str).to_numpy(dtype=object)
    test = patient_uniform(ids, config.seed, SPLIT_SALT) < config.test_size
    x = encode_inputs(pop, config.inputs)
    feat = pd.DataFrame(features.transform(x, spec), columns=names)
    feat["__y"] = pop[config.label].to_numpy(dtype=np.float32)
    feat["__t"] = t.astype(np.float32)
    feat["__test"] = test
    feat["__fold"] = np.floor(patient_uniform(ids, config.seed, FOLD_SALT) * config.folds).astype(np.int8)
    feat["__sample"] = patient_uniform(ids, config.seed, SAMPLE_SALT)
    counts["test_rows"] = int(test.sum())
    true = None
    if truth is not None:
        table = read_piece(truth)
        same = np.array_equal(table["patient_id"].astype(str).to_numpy()[positions], ids.astype(str))
        if same and set(TRUTH_COLUMNS) <= set(table.columns):
            true = table[list(TRUTH_COLUMNS)].apply(pd.to_numeric).iloc[positions].reset_index(drop=True)
    return {"pop": pop, "x": x, "features": feat, "counts": counts, "truth": true}


def _arms(prep: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    feat = prep["features"]
    return feat["__t"].to_numpy(np.int8), feat["__y"].to_numpy(np.int8), prep["counts"]


def _nuisance_rows(prep: dict, name: str, names: list[str]) -> pd.DataFrame:
    """One nuisance model's view of a partition for ``_tune_and_fit``: its label in ``__y`` and every
    row it must not train on marked ``__test`` (held-out patients, and the other arm's for mu0 / mu1)."""
    feat = prep["features"]
    part = feat[[*names, "__y", "__test", "__fold"]].copy()
    t = feat["__t"].to_numpy()
    if name == "untreated":
        part["__test"] = part["__test"].to_numpy() | (t == 1)
    elif name == "treated":
        part["__test"] = part["__test"].to_numpy() | (t == 0)
    else:
        part["__y"] = feat["__t"]
    return part


def _risk(model, f: np.ndarray, booster=None, rounds: int | None = None) -> np.ndarray:
    """Calibrated risk of feature rows from the model's booster (or one of its fold boosters)."""
    if len(f) == 0:
        return np.zeros(0)
    b = model.booster if booster is None else booster
    kwargs = {} if rounds is None else {"iteration_range": (0, rounds)}
    return model.calibrator.apply(b.inplace_predict(f, predict_type="margin", **kwargs))


def _crossfit(prep: dict, nuisances: dict, names: list[str], inputs: list[str], overlap: list[float]) -> dict:
    """Runs on a worker: each training patient's cross-fitted mu0, mu1, e and pseudo-outcome, as
    ``causal.fit_nuisances`` gives them (a model's own training patients get its fold booster that never
    saw them; mu0 on treated and mu1 on untreated patients the full model)."""
    feat = prep["features"]
    train = ~feat["__test"].to_numpy()
    f = feat.loc[train, names].to_numpy(dtype=np.float32)
    fold = feat.loc[train, "__fold"].to_numpy()
    t = feat.loc[train, "__t"].to_numpy(dtype=np.float64)
    y = feat.loc[train, "__y"].to_numpy(dtype=np.float64)
    out_of_fold = {}
    for name in NUISANCES:
        m = nuisances[name]
        oof = np.zeros(len(f))
        for k, (booster, rounds) in enumerate(zip(m.fold_boosters, m.fold_best_rounds, strict=True)):
            rows = fold == k
            oof[rows] = _risk(m, f[rows], booster, rounds)
        out_of_fold[name] = oof
    r0 = np.where(t == 0, out_of_fold["untreated"], _risk(nuisances["untreated"], f))
    r1 = np.where(t == 1, out_of_fold["treated"], _risk(nuisances["treated"], f))
    e = out_of_fold["propensity"]
    cross = pd.DataFrame({"y": y, "t": t, "fold": fold, "r0": r0, "r1": r1, "e": e,
                          "phi": causal.pseudo_outcome(y, t, r0, r1, e, overlap)})  # fmt: skip
    h = causal.modifier_matrix(prep["x"][train], inputs)
    return {"cross": cross, "h": h, "f": f, "sample": feat.loc[train, "__sample"].to_numpy()}


def _sums(crossed: dict, folds: int) -> dict:
    """Runs on a worker: what the constant and the ridge stage need, per fold left out (and ``ALL``)."""
    c, h = crossed["cross"], crossed["h"]
    z = causal.ridge_basis(h, c["r0"].to_numpy())
    phi, fold = c["phi"].to_numpy(), c["fold"].to_numpy()
    out = {}
    for k in [*range(folds), ALL]:
        rows = fold != k
        out[k] = {"n": int(rows.sum()), "phi": float(phi[rows].sum()),
                  "zz": z[rows].T @ z[rows], "zphi": z[rows].T @ phi[rows]}  # fmt: skip
    return out


def _forest_piece(crossed: dict, fold: int, kind: str, label: bool, names: list[str]):
    """A forest's training rows of one partition (fold ``fold`` left out): features, or the target."""
    c = crossed["cross"]
    rows = c["fold"].to_numpy() != fold
    t = c["t"].to_numpy()
    if kind == "x0":
        rows &= t == 0
    elif kind == "x1":
        rows &= t == 1
    if not label:
        return pd.DataFrame(crossed["f"][rows], columns=names)
    target = {"dr": c["phi"], "x0": c["y"] - c["r1"], "x1": c["r0"] - c["y"]}[kind]
    return pd.Series(target.to_numpy()[rows], dtype=np.float64)


def _fit_forests(client, crossed: list, where: list[str], kinds: tuple[str, ...], fold: int, seed: int,
                 names: list[str]) -> dict:  # fmt: skip
    """``causal.fit_forest`` with xgboost.dask: one forest per kind on the training patients outside
    ``fold``, each partition's rows on the worker its training rows are pinned to."""
    import dask.dataframe as dd
    import xgboost.dask as dxgb
    from xgboost.collective import Config as CollConfig

    params = {**causal.FOREST_PARAMS, "seed": seed, "nthread": threads_per_worker(client)}
    x_meta = pd.DataFrame({name: pd.Series(dtype=np.float32) for name in names})
    out = {}
    for kind in kinds:
        pieces = [dd.from_delayed([_pinned(client, _forest_piece, c, fold, kind, label, names, worker=w)
                                   for c, w in zip(crossed, where, strict=True)],
                                  meta=pd.Series(dtype=np.float64) if label else x_meta, verify_meta=False)
                  for label in (False, True)]  # fmt: skip
        matrix = dxgb.DaskQuantileDMatrix(client, pieces[0], label=pieces[1])
        booster = guarded(client, lambda m=matrix: dxgb.train(
            client, params, m, num_boost_round=causal.FOREST_ROUNDS, verbose_eval=False,
            coll_cfg=CollConfig(timeout=COLLECTIVE_TIMEOUT_S),
        )["booster"], f"benefit forest {kind}")  # fmt: skip
        booster.feature_names = None  # as one process fits it (causal.fit_forest): scored by position
        out[kind] = booster
    return out


def _forest_predict(booster, f: np.ndarray) -> np.ndarray:
    if len(f) == 0:
        return np.zeros(0)
    return np.asarray(booster.inplace_predict(f, predict_type="margin"), np.float64)


def _out_of_fold(crossed: dict, folds: int, constant: dict, ridges: dict, forests: dict) -> pd.DataFrame:
    """Runs on a worker: every learner's out-of-fold benefit for each training patient of the partition
    (``causal.select_learner``'s loop), beside the numbers the selection scores them with."""
    c, h, f = crossed["cross"], crossed["h"], crossed["f"]
    fold, r0, r1, e = (c[k].to_numpy() for k in ("fold", "r0", "r1", "e"))
    out = c[["y", "t", "r0", "r1", "e", "phi"]].copy()
    oof = {name: np.zeros(len(c)) for name in ("constant", "x_learner", "dr_forest")}
    ridge = {lam: np.zeros(len(c)) for lam in causal.RIDGE_LAMBDAS}
    for k in range(folds):
        va = fold == k
        oof["constant"][va] = constant[k]
        for lam in causal.RIDGE_LAMBDAS:
            ridge[lam][va] = ridges[k][lam].predict(h[va], r0[va])
        oof["dr_forest"][va] = _forest_predict(forests[k]["dr"], f[va])
        tau0, tau1 = _forest_predict(forests[k]["x0"], f[va]), _forest_predict(forests[k]["x1"], f[va])
        oof["x_learner"][va] = e[va] * tau0 + (1 - e[va]) * tau1
    out["t_learner"] = r0 - r1
    for name, v in oof.items():
        out[name] = v
    for lam, v in ridge.items():
        out[f"ridge:{lam}"] = v
    return out


def _balance_sample(crossed: dict, fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = crossed["sample"] < fraction
    c = crossed["cross"]
    return crossed["f"][rows], c["t"].to_numpy()[rows], c["e"].to_numpy()[rows]


def _held_out(prep: dict, model: causal.BenefitModel, rules: list, label: str) -> pd.DataFrame:
    """Runs on a worker: the held-out patients' outcome, treatment, trigger, the model's outputs, each
    guardrail's status and the truth (when there is one)."""
    test = prep["features"]["__test"].to_numpy()
    pop = prep["pop"].loc[test].reset_index(drop=True)
    x = prep["x"][test]
    if len(x):
        pred = model.predict(x)
    else:
        pred = {name: np.zeros(0) for name in ("benefit", "risk_untreated", "risk_treated", "propensity")}
    held = pop[["patient_id", label, causal.TREATMENT, "trigger"]].copy()
    for name, v in pred.items():
        held[name] = v
    status = guardrails.evaluate(rules, pop, pred)
    for rule in status.columns:
        held[STATUS + rule] = status[rule].to_numpy()
    if prep["truth"] is not None:
        for column in TRUTH_COLUMNS:
            held[column] = prep["truth"][column].to_numpy()[test]
    held["__sample"] = prep["features"]["__sample"].to_numpy()[test]
    return held


def _check_inputs(prep: dict, fraction: float) -> np.ndarray:
    feat = prep["features"]
    rows = feat["__test"].to_numpy() & (feat["__sample"].to_numpy() < fraction)
    return prep["x"][rows]


def train_benefit_on_cluster(client, data_path: str | Path, units, config: Config,
                             log: Callable[[str], None] = print) -> causal.BenefitTraining:  # fmt: skip
    """``pipelines.il1_benefit``'s training step on a cluster (see the module's docstring)."""
    started = time.perf_counter()
    if config.tuning.parallel_trials > 1:
        worker_groups(client, config.tuning.parallel_trials)  # too few workers: fail before any work
    data_path = Path(data_path)
    loaded = load_partitioned(client, data_path, units, require_labels=(config.label, causal.TREATMENT))
    task = config.task
    log(f"{task}: {loaded.rows:,} rows in {len(loaded.pieces)} partitions validated on the cluster")
    truth = truth_pieces(data_path, loaded.pieces) or [None] * len(loaded.pieces)
    spec = features.feature_spec(config.inputs, config.score_features)
    names = features.feature_names(spec)
    prepared = client.map(_prepare, loaded.partitions, truth, config=config, spec=spec, names=names,
                          pure=False)  # fmt: skip
    arms = client.gather(client.map(_arms, prepared, pure=False))
    counts = [a[2] for a in arms]
    extra = ("test_rows", "skipped_treatment")
    total = {k: sum(c[k] for c in counts) for k in counts[0] if k not in extra}
    population = population_report(config, total)
    skipped_treatment = sum(c["skipped_treatment"] for c in counts)
    t_all, y_all = np.concatenate([a[0] for a in arms]), np.concatenate([a[1] for a in arms])
    arm_counts = causal.check_arms(t_all, y_all, config.folds)
    n_test = sum(c["test_rows"] for c in counts)
    n_train = len(t_all) - n_test
    if n_test == 0 or n_train == 0:
        raise TrainingDataError(f"cannot split {len(t_all)} patients with test_size={config.test_size}")
    log(f"{task}: {len(t_all):,} MAS patients used ({int(t_all.sum()):,} treated, {int(y_all.sum()):,} "
        f"deaths); skipped {population.skipped_outside_population:,} outside the population, "
        f"{population.skipped_label_missing:,} with no {config.label} and {skipped_treatment:,} with no "
        f"{causal.TREATMENT}; {n_test:,} held out")  # fmt: skip

    # ---- the three nuisance models, each tuned and fitted on its own rows of the cluster
    import dask.dataframe as dd

    fitted = {}
    for name in NUISANCES:
        parts = client.map(_nuisance_rows, prepared, name=name, names=names, pure=False)
        meta = client.submit(lambda p: p.iloc[:0], parts[0]).result()
        frame = dd.from_delayed(parts, meta=meta, verify_meta=False)
        fitted[name] = _tune_and_fit(client, frame[~frame["__test"]], parts, names, spec, config,
                                     lambda m, n=name: log(f"  {n}: {m.strip()}"))  # fmt: skip
    nuisances = causal.Nuisances(**fitted)
    [scattered] = client.scatter([fitted], broadcast=True)
    crossed = client.map(_crossfit, prepared, nuisances=scattered, names=names, inputs=config.inputs,
                         overlap=list(config.overlap), pure=False)  # fmt: skip

    # ---- learners out of fold: sums for the constant and ridge, xgboost.dask for the forests
    workers = sorted(worker_addresses(client))
    where = [workers[i % len(workers)] for i in range(len(crossed))]
    crossed = [_pinned(client, lambda c: c, c, worker=w) for c, w in zip(crossed, where, strict=True)]
    sums = _add(client.gather(client.map(_sums, crossed, folds=config.folds, pure=False)))
    constant = {k: s["phi"] / s["n"] for k, s in sums.items()}
    ridges = {k: {lam: causal.ridge_from_sums(s["zz"], s["zphi"], lam) for lam in causal.RIDGE_LAMBDAS}
              for k, s in sums.items()}  # fmt: skip
    forests = {k: _fit_forests(client, crossed, where, FORESTS, k, config.seed, names)
               for k in range(config.folds)}  # fmt: skip
    [learned] = client.scatter([{"constant": constant, "ridges": ridges, "forests": forests}], broadcast=True)
    oof = pd.concat(client.gather(client.map(
        lambda c, m, folds: _out_of_fold(c, folds, m["constant"], m["ridges"], m["forests"]),
        crossed, m=learned, folds=config.folds, pure=False)), ignore_index=True)  # fmt: skip
    per_patient = {k: oof[k].to_numpy() for k in ("y", "t", "r0", "r1", "e", "phi")}
    selection = causal.choose_learner(
        {name: oof[name].to_numpy() for name in ("constant", "t_learner", "x_learner", "dr_forest")},
        {lam: oof[f"ridge:{lam}"].to_numpy() for lam in causal.RIDGE_LAMBDAS},
        per_patient["phi"], per_patient["y"], per_patient["t"], per_patient, config.overlap,
    )  # fmt: skip
    for line in causal.selection_lines(selection, task):
        log(line)

    # ---- the chosen final stage on every training patient
    model = causal.BenefitModel(
        nuisances=nuisances, learner=selection.chosen, input_names=list(config.inputs), spec=spec
    )
    if selection.chosen == "constant":
        model.constant = float(per_patient["phi"].mean())
    elif selection.chosen == "dr_ridge":
        model.ridge = ridges[ALL][selection.ridge_lambda]
    elif selection.chosen == "dr_forest":
        model.dr_forest = _fit_forests(client, crossed, where, ("dr",), ALL, config.seed, names)["dr"]
    elif selection.chosen == "x_learner":
        final = _fit_forests(client, crossed, where, ("x0", "x1"), ALL, config.seed, names)
        model.x_tau0, model.x_tau1 = final["x0"], final["x1"]

    # ---- held-out patients: per-patient numbers back; samples for the gates and the balance table
    rules = guardrails.benefit_guardrails(config.overlap)
    [shared] = client.scatter([model], broadcast=True)
    held_parts = client.map(_held_out, prepared, model=shared, rules=rules, label=config.label, pure=False)
    held = pd.concat(client.gather(held_parts), ignore_index=True)
    fraction = min(1.0, CHECK_ROWS / n_test)
    x_check = np.concatenate(client.gather(client.map(_check_inputs, prepared, fraction=fraction,
                                                      pure=False)))  # fmt: skip
    check_rows = np.flatnonzero(held["__sample"].to_numpy() < fraction)
    sampled = client.gather(client.map(_balance_sample, crossed, fraction=min(1.0, BASELINE_ROWS / n_train),
                                       pure=False))  # fmt: skip
    f_b, t_b, e_b = (np.concatenate([s[i] for s in sampled]) for i in range(3))
    described = client.gather(client.map(_descriptions, prepared, inputs=config.inputs, label=config.label,
                                         pure=False))  # fmt: skip
    synthetic = truth[0] is not None
    complete = set(TRUTH_COLUMNS) <= set(held.columns) and not held[list(TRUTH_COLUMNS)].isna().any(axis=None)
    if synthetic and not complete:
        raise TrainingDataError(
            f"the ground truth beside {data_path} does not hold {list(TRUTH_COLUMNS)} for every patient in "
            "the data's row order; move it away to train without it"
        )
    outputs = ("benefit", "risk_untreated", "risk_treated", "propensity")
    status = held[[c for c in held.columns if c.startswith(STATUS)]]
    fingerprint = fingerprint_on_cluster(client, loaded)
    log(f"{task}: trained on the cluster in {time.perf_counter() - started:.0f} s")
    return causal.BenefitTraining(
        model=model,
        selection=selection,
        population=population,
        skipped_treatment=skipped_treatment,
        arms=arm_counts,
        test=held[["patient_id", config.label, causal.TREATMENT, "trigger"]],
        prediction={name: held[name].to_numpy() for name in outputs},
        guardrail_status=status.rename(columns=lambda c: c[len(STATUS):]),
        truth=held[list(TRUTH_COLUMNS)] if synthetic else None,
        x_check=x_check,
        check_rows=check_rows,
        train_t=per_patient["t"],
        train_e=per_patient["e"],
        phi_train=per_patient["phi"],
        balance=causal.balance_table(f_b, names, t_b, e_b, config.overlap),
        **cluster_record(client, data_path, loaded, fingerprint, described, config, rows_used=len(t_all),
                         train_rows=n_train, test_rows=n_test, synthetic=synthetic),  # fmt: skip
    )


def _add(parts: list[dict]) -> dict:
    """Partitions' ``_sums`` added up, fold by fold, in partition order (the same order every run)."""
    total: dict[Any, dict] = {}
    for part in parts:
        for k, s in part.items():
            if k not in total:
                total[k] = {key: (v.copy() if isinstance(v, np.ndarray) else v) for key, v in s.items()}
            else:
                for key, v in s.items():
                    total[k][key] = total[k][key] + v
    return total
