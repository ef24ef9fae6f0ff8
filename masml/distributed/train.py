"""A risk model trained on a Dask cluster: the same population, features, tuning, calibration and
booster as ``masml.training``, with the data left on the workers.

What each step does on the cluster, and where it differs from one process:

* Validation, population, features, the held-out columns and the data description run on each
  partition where it lies (``masml.distributed.data``; ``population_rows``, ``features.transform``,
  ``held_out_columns``, ``card.description_counts``); only counts and per-row scalars come back.
* Split and folds: a seeded hash of ``patient_id``, so every row of a patient lands on the same side
  without a shuffle across workers. This is grouped exactly but stratified only in expectation (with
  events in the tens of thousands the test prevalence is within a few tenths of a percent of the
  whole); the single-process split is stratified exactly, so the two engines hold out different
  patients and their metrics differ by sampling noise.
* Tuning: the same seeded TPE search (``masml.training.search``); each trial is a K-fold
  cross-validation whose every fold is one ``xgboost.dask`` training, with early stopping on the fold's
  validation rows. With ``tuning.parallel_trials`` = 1 (the default) trials run one after another, each
  spread over every worker. With N > 1 the search proposes trials in batches of N and the workers are
  split into N disjoint groups (``worker_groups``); each group gets its own copy of the training rows,
  pinned partition by partition to its workers (``_group_folds``), and trial j of a batch trains on
  group j, all N at once. Why groups: xgboost.dask locks every worker it trains on (its collective
  cannot share a worker with another training), so trainings on shared workers would queue, not
  overlap. Why not plain xgboost per trial on one worker: it needs every training row in one worker's
  memory, or tuning on a sample, i.e. another search than the one-process run's. The trade-off: every
  trial still sees all training rows, but the cluster holds N copies of the fold data (a group of
  workers must have room for all of it) and each trial runs on 1/N of the workers, which pays when a
  training waits on per-round synchronisation more than it builds histograms (measured on 100k
  patients, 2 workers of a shared 2-core machine: tuning 1.2-1.7x faster with N = 2, ~40 MB more per
  worker; docs/distributed.md).
  Losses are told in trial-number order once a batch is done, so the trials depend on the seed and N,
  never on which one finishes first; each trial records its workers and its start and end (seconds
  from the start of tuning).
* Calibration is fitted on the out-of-fold margins of the best trial, gathered to this process: two
  numbers per training row. The logistic baseline is fitted on a seeded sample of at most
  ``BASELINE_ROWS`` training rows. The parity gate, SHAP and the champion comparison use a seeded sample
  of at most ``CHECK_ROWS`` held-out input rows.
* Every ``xgboost.dask`` call runs under ``cluster.guarded``, a whole batch of trials at a time (and
  the groups' copies of the data while they are made): a lost worker fails the run with a clear error
  instead of hanging it; trials still running in their threads are abandoned with the cluster.
* The final booster is trained as always: one ``xgboost.dask`` training on every worker and every
  training row, with the best trial's parameters.

Reproducibility: with the same data, partitions, config (``parallel_trials`` included), seed and
number of workers the run is repeatable; xgboost's distributed histograms depend on how rows are spread
over workers, so a different cluster shape (or another N, which changes both the trials proposed and
the workers each trial uses) gives a (slightly) different booster. That spread is fixed by position
(training partition i on the i-th worker by address, ``_training_parts``), never left to where the
scheduler happened to run a task, so a cluster's history does not change the model.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from masml import card, features
from masml.calibration import fit_calibrator
from masml.config import SEARCH_SPACE, Config
from masml.distributed.cluster import (
    COLLECTIVE_TIMEOUT_S,
    ClusterError,
    guarded,
    threads_per_worker,
    worker_addresses,
)
from masml.distributed.data import Piece, load_partitioned, pieces, read_piece
from masml.encoding import encode_inputs
from masml.training import (
    BASELINE_ROWS,
    RiskTraining,
    TrainedRiskModel,
    TrainingDataError,
    booster_params,
    fit_logistic_baseline,
    population_report,
    population_rows,
    search,
)

CHECK_ROWS = 20_000  # held-out input rows brought here for the parity gate, SHAP and champion checks
SPLIT_SALT, FOLD_SALT, SAMPLE_SALT = 0, 1, 2


def patient_uniform(ids: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """A uniform number in [0, 1) per patient id, the same on every worker and in every run."""
    key = f"masml{seed % 10**8:08d}{salt:03d}"  # siphash key: exactly 16 characters
    h = pd.util.hash_array(np.asarray(ids, dtype=object), hash_key=key, categorize=False)
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53)


def _prepare(frame: pd.DataFrame, config: Config, spec: list, names: list[str]) -> dict[str, Any]:
    """Runs on a worker: population, split, folds, input matrix and features of one partition."""
    keep, counts = population_rows(frame, config)
    pop = frame.loc[keep].reset_index(drop=True)
    ids = pop["patient_id"].astype(str).to_numpy(dtype=object)
    test = patient_uniform(ids, config.seed, SPLIT_SALT) < config.test_size
    x = encode_inputs(pop, config.inputs)
    feat = pd.DataFrame(features.transform(x, spec), columns=names)
    feat["__y"] = pop[config.label].to_numpy(dtype=np.float32)
    feat["__test"] = test
    feat["__fold"] = np.floor(patient_uniform(ids, config.seed, FOLD_SALT) * config.folds).astype(np.int8)
    feat["__sample"] = patient_uniform(ids, config.seed, SAMPLE_SALT)
    counts["test_rows"] = int(test.sum())
    return {"keep": keep.to_numpy(), "pop": pop, "x": x, "features": feat, "counts": counts}


def _counts(prep: dict) -> dict:
    return prep["counts"]


def _features(prep: dict) -> pd.DataFrame:
    return prep["features"]


def _descriptions(prep: dict, inputs: list[str], label: str) -> tuple[dict, dict]:
    test = prep["features"]["__test"].to_numpy()
    pop = prep["pop"]
    return (card.description_counts(pop.loc[~test], inputs, label),
            card.description_counts(pop.loc[test], inputs, label))  # fmt: skip


def _row_hashes(frame: pd.DataFrame) -> bytes:
    return pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes()


def _sample(prep: dict, held_out: bool, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    feat = prep["features"]
    rows = (feat["__test"].to_numpy() == held_out) & (feat["__sample"].to_numpy() < fraction)
    return prep["x"][rows], feat["__y"].to_numpy(dtype=np.float64)[rows]


def _held_out(prep: dict, truth: tuple[Piece, str] | None, models: dict, columns: Callable, label: str,
              names: list[str]) -> pd.DataFrame:  # fmt: skip
    """Runs on a worker: the evaluation's columns of one partition's held-out rows, and their risks."""
    test = prep["features"]["__test"].to_numpy()
    held = columns(prep["pop"].loc[test].reset_index(drop=True), label)
    f = prep["features"].loc[test, names].to_numpy(dtype=np.float32)
    margin = models["booster"].inplace_predict(f, predict_type="margin") if len(f) else np.zeros(0)
    held["risk"] = models["calibrator"].apply(margin)
    held["baseline"] = models["baseline"].predict_risk(prep["x"][test]) if len(f) else np.zeros(0)
    if truth is not None:
        piece, column = truth
        t = read_piece(piece)
        ids = t["patient_id"].astype(str).to_numpy()[prep["keep"]]
        if column in t.columns and np.array_equal(ids, prep["pop"]["patient_id"].astype(str).to_numpy()):
            held["ceiling"] = pd.to_numeric(t[column]).to_numpy(dtype=float)[prep["keep"]][test]
    return held


def _truth_pieces(data_path: Path, parts: list[Piece], label: str) -> list[tuple[Piece, str] | None]:
    """The ground truth beside a simulated cohort, piece by piece, when it is laid out like the data."""
    from masml.cohort import TRUTH_COLUMN

    column = TRUTH_COLUMN.get(label)
    truth = truth_pieces(data_path, parts) if column is not None else None
    return [None] * len(parts) if truth is None else [(t, column) for t in truth]


def truth_pieces(data_path: Path, parts: list[Piece]) -> list[Piece] | None:
    """The pieces of the ground truth beside a simulated cohort (None when there is none); refuses a truth
    not laid out one for one like the data, before any training."""
    from masml.cohort import truth_path_for

    path = truth_path_for(data_path)
    if not path.exists():
        return None
    truth = pieces(path)
    if [p.rows for p in truth] != [p.rows for p in parts]:
        raise TrainingDataError(
            f"the ground truth {path} is not laid out like the data {data_path} (files, row groups and rows "
            "must match one for one, as `masml cohort --out FOLDER` writes them); move it away to train "
            "without a ceiling"
        )
    return truth


def fingerprint_on_cluster(client, loaded) -> str:
    """``masml.bundle.data_fingerprint`` of a partitioned dataset: the same bytes, in the same order,
    hashed here from each partition's row hashes (the rows stay on the workers)."""
    digest = hashlib.sha256()
    digest.update("\x1f".join(map(str, loaded.frame.columns)).encode())
    for chunk in client.gather(client.map(_row_hashes, loaded.partitions, pure=False)):
        digest.update(chunk)
    return digest.hexdigest()


def _dataset_logger(data_path: Path, fingerprint: str) -> Callable[[], None]:
    def log() -> None:
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        source = resolve_dataset_source(str(data_path.resolve()))
        dataset = MetaDataset(source, name=data_path.name, digest=fingerprint[:16])
        mlflow.log_input(dataset, context="training")

    return log


def train_on_cluster(client, data_path: str | Path, units, config: Config, held_out_columns: Callable,
                     log: Callable[[str], None] = print) -> RiskTraining:  # fmt: skip
    """``pipelines.risk``'s training step on a cluster; ``held_out_columns(test_frame, label)`` gives the
    evaluation's columns for a partition's held-out rows (it runs on the workers)."""
    started = time.perf_counter()
    if config.tuning.parallel_trials > 1:
        worker_groups(client, config.tuning.parallel_trials)  # too few workers: fail before any work
    data_path = Path(data_path)
    loaded = load_partitioned(client, data_path, units, require_labels=(config.label,))
    log(f"{config.task}: {loaded.rows:,} rows in {len(loaded.pieces)} partitions validated on the cluster")
    truth = _truth_pieces(data_path, loaded.pieces, config.label)  # a misplaced truth fails before training
    spec = features.feature_spec(config.inputs, config.score_features)
    names = features.feature_names(spec)
    prepared = client.map(_prepare, loaded.partitions, config=config, spec=spec, names=names, pure=False)
    counts = client.gather(client.map(_counts, prepared, pure=False))
    total = {k: sum(c[k] for c in counts) for k in counts[0] if k != "test_rows"}
    population = population_report(config, total)
    n_test = sum(c["test_rows"] for c in counts)
    n_train = population.rows_used - n_test
    if n_test == 0 or n_train == 0:
        raise TrainingDataError(f"cannot split {population.rows_used} rows with test_size={config.test_size}")
    log(f"{config.task}: {population.rows_used:,} rows used ({population.events:,} events); skipped "
        f"{population.skipped_outside_population:,} outside the population and "
        f"{population.skipped_label_missing:,} with no label; {n_test:,} held out")  # fmt: skip

    import dask.dataframe as dd

    feat_meta = client.submit(lambda p: p["features"].iloc[:0], prepared[0]).result()
    feature_parts = client.map(_features, prepared, pure=False)
    feat = dd.from_delayed(feature_parts, meta=feat_meta, verify_meta=False)
    train = feat[~feat["__test"]]
    model = _tune_and_fit(client, train, feature_parts, names, spec, config, log)

    sample_train = min(1.0, BASELINE_ROWS / n_train)
    xs, ys = zip(*client.gather(client.map(_sample, prepared, held_out=False, fraction=sample_train,
                                           pure=False)), strict=True)  # fmt: skip
    baseline = fit_logistic_baseline(np.concatenate(xs), np.concatenate(ys), config.inputs, seed=config.seed,
                                     score_features=config.score_features)  # fmt: skip
    [models] = client.scatter([{"booster": model.booster, "calibrator": model.calibrator,
                                "baseline": baseline}], broadcast=True)  # fmt: skip
    held_parts = client.gather(client.map(
        _held_out, prepared, truth, models=models, columns=held_out_columns, label=config.label,
        names=names, pure=False))  # fmt: skip
    held = pd.concat(held_parts, ignore_index=True)
    synthetic = any(t is not None for t in truth)  # as on one process: a truth file beside the data
    if synthetic and ("ceiling" not in held.columns or held["ceiling"].isna().any()):
        raise TrainingDataError(
            f"the ground truth beside {data_path} does not hold {config.label}'s true probability for every "
            "held-out patient, in the data's row order; move it away to train without a ceiling"
        )
    sample_test = min(1.0, CHECK_ROWS / n_test)
    xs, ys = zip(*client.gather(client.map(_sample, prepared, held_out=True, fraction=sample_test,
                                           pure=False)), strict=True)  # fmt: skip
    x_check, y_check = np.concatenate(xs), np.concatenate(ys)

    described = client.gather(client.map(_descriptions, prepared, inputs=config.inputs, label=config.label,
                                         pure=False))  # fmt: skip
    fingerprint = fingerprint_on_cluster(client, loaded)
    log(f"{config.task}: trained on the cluster in {time.perf_counter() - started:.0f} s")
    return RiskTraining(
        model=model,
        population=population,
        held_out=held,
        x_check=x_check,
        y_check=y_check,
        **cluster_record(client, data_path, loaded, fingerprint, described, config,
                         rows_used=population.rows_used, train_rows=n_train, test_rows=n_test,
                         synthetic=synthetic),  # fmt: skip
    )


def cluster_record(client, data_path: Path, loaded, fingerprint: str, described: list, config: Config,
                   **counts) -> dict[str, Any]:  # fmt: skip
    """The fields a cluster-trained model's record shares, risk or benefit model: the data description
    merged from the partitions', the training data (with the engine), the split and the dataset logger."""
    workers = len(client.scheduler_info(n_workers=-1)["workers"])
    return {
        "train_description": card.merge_descriptions([d[0] for d in described]),
        "test_description": card.merge_descriptions([d[1] for d in described]),
        "training_data": {
            "source": data_path.name, "fingerprint": fingerprint, "rows": loaded.rows, **counts,
            "engine": f"dask ({workers} workers, {len(loaded.pieces)} partitions)",
        },  # fmt: skip
        "split": f"held-out {config.test_size:.0%} by a seeded hash of patient_id (seed {config.seed}): "
        "grouped by patient, stratified in expectation",
        "log_dataset": _dataset_logger(data_path, fingerprint),
    }


def worker_groups(client, n: int) -> list[list[str]]:
    """``n`` disjoint groups of equally many workers (the scheduler's workers in address order; any
    remainder sits out the tuning). Which worker is in which group does not matter: the rows of a
    group's copy are laid out by position (see ``_group_folds``)."""
    workers = sorted(worker_addresses(client))
    if n > len(workers):
        raise ClusterError(
            f"config key 'tuning.parallel_trials' is {n}: that many trials run at once, each on its own "
            f"workers, but the cluster has {len(workers)}; set parallel_trials <= {len(workers)} or add "
            "workers"
        )
    size = len(workers) // n
    return [workers[i * size : (i + 1) * size] for i in range(n)]


def _training_rows(feat: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    rows = ~feat["__test"].to_numpy()
    return feat.loc[rows, [*names, "__y", "__fold"]].reset_index(drop=True)


def _same(part: pd.DataFrame) -> pd.DataFrame:
    return part


def _fold_piece(part: pd.DataFrame, fold: int, valid: bool, columns: list[str] | str):
    rows = (part["__fold"].to_numpy() == fold) == valid
    return part.loc[rows, columns].reset_index(drop=True)


def _pinned(client, fn, *args, worker: str):
    return client.submit(fn, *args, workers=[worker], allow_other_workers=False, pure=False)


def _training_parts(client, feature_parts: list, names: list[str]) -> tuple[list, list[str]]:
    """Each partition's training rows, pinned by position (partition i on the i-th worker in address
    order), and those workers. Why by position: xgboost's histograms, and so the booster, depend on how
    rows are spread over workers; where the scheduler happened to put a partition depends on what the
    cluster did before (tests on a shared cluster saw two same-seed runs differ). Tuning folds and the
    final fit are cut from these pieces, so the layout is a function of the data and the cluster size."""
    workers = sorted(worker_addresses(client))
    where = [workers[i % len(workers)] for i in range(len(feature_parts))]
    parts = [_pinned(client, _training_rows, part, names, worker=w)
             for part, w in zip(feature_parts, where, strict=True)]  # fmt: skip
    return parts, where


def _columns(part: pd.DataFrame, columns: list[str] | str):
    return part[columns]


def _group_folds(client, training_parts: list, names: list[str], meta: pd.DataFrame, group: list[str],
                 folds: int) -> list[tuple[Any, Any]]:  # fmt: skip
    """A worker group's own copy of the training rows, cut into its (train, valid) fold matrices. Every
    piece is pinned to one worker of the group (partition i on worker i mod len(group)), so the
    group's trainings never touch another group's workers and lay the rows out the same way in
    every run; xgboost.dask then trains where the pieces are."""
    import dask.dataframe as dd
    import xgboost.dask as dxgb

    where = [group[i % len(group)] for i in range(len(training_parts))]  # a copy, laid out for the group
    rows = [_pinned(client, _same, p, worker=w) for p, w in zip(training_parts, where, strict=True)]
    x_meta, y_meta = meta[names], meta["__y"]
    out = []
    for k in range(folds):
        pieces = {}
        for valid in (False, True):
            for column, m in ((names, x_meta), ("__y", y_meta)):
                futures = [_pinned(client, _fold_piece, r, k, valid, column, worker=w)
                           for r, w in zip(rows, where, strict=True)]  # fmt: skip
                pieces[valid, column == "__y"] = dd.from_delayed(futures, meta=m, verify_meta=False)
        dtr = dxgb.DaskQuantileDMatrix(client, pieces[False, False], label=pieces[False, True])
        dva = dxgb.DaskQuantileDMatrix(client, pieces[True, False], label=pieces[True, True], ref=dtr)
        for d in (dtr, dva):
            strays = set(d.worker_map) - set(group)
            if strays:  # never seen; it would make trials share workers and their results timing-dependent
                raise ClusterError(f"tuning data meant for workers {group} landed on {sorted(strays)}")
        out.append((dtr, dva))
    return out


def _tune_and_fit(client, train, feature_parts: list, names: list[str], spec: list, config: Config,
                  log) -> TrainedRiskModel:  # fmt: skip
    """``masml.training.tune_and_fit`` with every xgboost training on the cluster.

    ``tuning.parallel_trials`` = 1: each trial's folds train one after another on every worker, on the
    training rows where they lie. N > 1: the workers are split into N groups, each holding its own copy
    of the training rows; the N trials of a batch run at the same time, trial j of a batch on group j.
    xgboost.dask's collective needs each of its workers to itself (it takes a lock on every worker it
    trains on), so concurrent trainings must not share workers: disjoint groups are what lets them
    overlap instead of queueing."""
    import xgboost.dask as dxgb
    from xgboost.collective import Config as CollConfig

    started = time.perf_counter()
    nthread = threads_per_worker(client)
    coll = CollConfig(timeout=COLLECTIVE_TIMEOUT_S)
    tuning = config.tuning
    parts, where = _training_parts(client, feature_parts, names)
    if tuning.parallel_trials == 1:  # one group of every worker: the pieces stay where they are pinned
        groups: list[list[str]] = [sorted(worker_addresses(client))]
    else:
        groups = worker_groups(client, tuning.parallel_trials)
    meta = train._meta

    def copies() -> list:
        return [_group_folds(client, parts, names, meta, g, config.folds) for g in groups]

    group_folds = guarded(client, copies, "tuning data")
    if tuning.parallel_trials > 1:
        log(f"{config.task}: {len(groups)} trials at a time, on worker groups of {len(groups[0])} "
            f"(each with its own copy of the training rows)")  # fmt: skip

    def params_of(params: dict) -> dict:
        return {**booster_params(params, config.seed), "nthread": nthread}

    def cross_validate(params: dict[str, Any], folds: list) -> dict[str, Any]:
        began = time.perf_counter() - started
        losses, rounds, boosters = [], [], []
        for dtr, dva in folds:
            booster = dxgb.train(
                client, params_of(params), dtr, num_boost_round=tuning.max_rounds, evals=[(dva, "valid")],
                early_stopping_rounds=tuning.early_stopping_rounds, verbose_eval=False, coll_cfg=coll,
            )["booster"]  # fmt: skip
            losses.append(float(booster.best_score))
            rounds.append(int(booster.best_iteration) + 1)
            boosters.append(booster)
        ended = time.perf_counter() - started
        return {"loss": float(np.mean(losses)), "rounds": rounds, "boosters": boosters,
                "started_s": round(began, 3), "finished_s": round(ended, 3)}  # fmt: skip

    def run_all(asked: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
        """A batch's trials, trial j on group j, each in its own daemon thread (a thread stuck in a
        training abandoned by ``guarded`` must not keep the process alive)."""
        if len(asked) == 1:
            return [cross_validate(asked[0][1], group_folds[0])]
        outcomes: list[dict[str, Any]] = [{} for _ in asked]

        def one(j: int, params: dict[str, Any]) -> None:
            try:
                outcomes[j]["result"] = cross_validate(params, group_folds[j])
            except BaseException as err:  # handed to the batch's thread below
                outcomes[j]["error"] = err

        threads = [threading.Thread(target=one, args=(j, params), daemon=True, name=f"masml-trial-{number}")
                   for j, (number, params) in enumerate(asked)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for o in outcomes:  # the first failure in trial order
            if "error" in o:
                raise o["error"]
        return [o["result"] for o in outcomes]

    best: dict[str, Any] = {}
    records: list[dict[str, Any]] = []

    def run_batch(asked: list[tuple[int, dict[str, Any]]]) -> list[float]:
        results = guarded(client, lambda: run_all(asked), "tuning")
        for j, ((number, params), r) in enumerate(zip(asked, results, strict=True)):  # trial-number order
            records.append({"number": number, "params": params, "value": r["loss"],
                            "n_rounds": int(np.mean(r["rounds"])), "workers": len(groups[j]),
                            "started_s": r["started_s"], "finished_s": r["finished_s"]})  # fmt: skip
            n = len(groups[j])
            log(f"  trial {number}: CV log loss {r['loss']:.4f} (cluster, {n} worker{'s' * (n != 1)}, "
                f"{r['started_s']:.1f}-{r['finished_s']:.1f} s)")  # fmt: skip
            if not best or r["loss"] < best["loss"]:
                best.update(loss=r["loss"], params=params, rounds=r["rounds"], boosters=r["boosters"])
        return [r["loss"] for r in results]

    search(lambda number, params: run_batch([(number, params)])[0], config, run_batch)
    group_folds.clear()  # the fold matrices (and the groups' copies of the rows) are released here
    log(f"{config.task}: {len(records)} trials tuned in {time.perf_counter() - started:.1f} s, "
        f"{tuning.parallel_trials} at a time")  # fmt: skip

    import dask.dataframe as dd

    def fold_valid(k: int, column: list[str] | str):
        """Fold k's validation rows (the same rows, in the same order, as ``train[train.__fold == k]``),
        cut from the pinned training pieces where they lie. Why not from ``train``: each fold would
        filter every whole feature partition, held-out rows included, on whichever worker the
        scheduler picked (moving the partition there first if it lay elsewhere)."""
        futures = [_pinned(client, _fold_piece, r, k, True, column, worker=w)
                   for r, w in zip(parts, where, strict=True)]  # fmt: skip
        return dd.from_delayed(futures, meta=meta[column], verify_meta=False)

    margins, labels = [], []
    for k, (booster, n) in enumerate(zip(best["boosters"], best["rounds"], strict=True)):
        margin = dxgb.inplace_predict(
            client, booster, fold_valid(k, names), predict_type="margin", iteration_range=(0, n)
        )
        m, y = client.compute([margin, fold_valid(k, "__y")], sync=True)
        margins.append(np.asarray(m, dtype=np.float64).ravel())
        labels.append(np.asarray(y, dtype=np.float64))
    oof_margin, oof_y = np.concatenate(margins), np.concatenate(labels)
    calibrator = fit_calibrator(oof_margin, oof_y, config.calibration)
    n_rounds = max(1, int(round(float(np.mean(best["rounds"])))))

    placed = list(zip(parts, where, strict=True))  # the final fit on the same layout as the tuning
    x_all = dd.from_delayed([_pinned(client, _columns, r, names, worker=w) for r, w in placed],
                            meta=train._meta[names], verify_meta=False)  # fmt: skip
    y_all = dd.from_delayed([_pinned(client, _columns, r, "__y", worker=w) for r, w in placed],
                            meta=train._meta["__y"], verify_meta=False)  # fmt: skip
    dall = dxgb.DaskQuantileDMatrix(client, x_all, label=y_all)
    out = guarded(client, lambda: dxgb.train(
        client, params_of(best["params"]), dall, num_boost_round=n_rounds, verbose_eval=False, coll_cfg=coll,
    ), "final fit")  # fmt: skip
    booster = out["booster"]
    booster.feature_names = names
    best_params = {name: best["params"][name] for name in SEARCH_SPACE}
    return TrainedRiskModel(
        booster=booster,
        spec=spec,
        input_names=list(config.inputs),
        feature_names=names,
        calibrator=calibrator,
        best_params=best_params,
        n_rounds=n_rounds,
        oof_margin=oof_margin,  # fold by fold (the cluster keeps no global row order)
        oof_risk=calibrator.apply(oof_margin),
        cv_logloss=float(best["loss"]),
        trials=records,
        seed=config.seed,
        stopped_by_timeout=len(records) < tuning.n_trials,
        fit_seconds=time.perf_counter() - started,
        fold_best_rounds=list(best["rounds"]),
        fold_boosters=list(best["boosters"]),
    )
