"""Pipeline settings: one dataclass per training run, loaded from YAML with strict validation.

Where the defaults live: **in code** (``DEFAULTS`` below), one set per task. A YAML file only overrides
them, key by key, so a hospital can write a three-line file (say, a different ``seed`` and
``calibration``) and inherit everything else. ``configs/onset.yaml`` and ``configs/icu.yaml`` spell out
every default with comments, for people to read and copy; ``tests/test_training.py`` checks that they
load to exactly the in-code defaults. ``load_config(None, task)`` therefore needs no file on disk and
works the same from a source checkout and from an installed wheel.

Why strict: a misspelt key (``n_trail: 200``) silently ignored would train a different model than the
one the person thinks they configured, so an unknown key, a wrong type or a value out of range is an
error that names the key, the value and what was expected.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from masml.schema import INPUT_NAMES, LABEL_NAMES

TASKS = ("onset", "icu", "il1_benefit")
POPULATIONS = ("all", "mas_only")
CALIBRATIONS = ("isotonic", "platt")

# Search-space dimensions sampled on a log scale (their lower bound must be > 0); the others linearly.
LOG_SCALE = ("learning_rate", "min_child_weight", "reg_lambda", "reg_alpha")
SEARCH_SPACE = (
    "max_depth",
    "learning_rate",
    "min_child_weight",
    "subsample",
    "colsample_bytree",
    "reg_lambda",
    "reg_alpha",
    "gamma",
)
INT_PARAMS = ("max_depth",)


class ConfigError(ValueError):
    """A configuration problem; the message names the key, the value and what was expected."""


@dataclass
class TuningConfig:
    """The hyper-parameter search: budget, search space ([low, high] per xgboost parameter), rounds.

    ``n_trials`` is the binding budget. ``timeout_s`` is only a safety cap: if it stops the search before
    ``n_trials`` trials, how many trials ran depends on the machine's speed, so the same data, config and
    seed may then give a different model (the run records the number of trials it completed).

    ``parallel_trials`` (N) makes the search propose trials in batches of N, each batch chosen before
    any of its results are known and told in trial-number order, so the trials depend on the seed and
    N, never on which trial finishes first. On a Dask cluster a batch's trials run at the same time,
    each on its own group of workers (``masml.distributed.train``); on one process they run one after
    another (the same search, no speed-up). 1 is the classic sequential search.
    """

    n_trials: int = 20
    timeout_s: float | None = 900.0
    parallel_trials: int = 1
    max_depth: list[int] = field(default_factory=lambda: [2, 6])
    learning_rate: list[float] = field(default_factory=lambda: [0.02, 0.2])
    min_child_weight: list[float] = field(default_factory=lambda: [1.0, 50.0])
    subsample: list[float] = field(default_factory=lambda: [0.5, 1.0])
    colsample_bytree: list[float] = field(default_factory=lambda: [0.3, 1.0])
    reg_lambda: list[float] = field(default_factory=lambda: [0.1, 50.0])
    reg_alpha: list[float] = field(default_factory=lambda: [0.001, 10.0])
    gamma: list[float] = field(default_factory=lambda: [0.0, 2.0])
    max_rounds: int = 1000
    early_stopping_rounds: int = 50

    def bounds(self) -> dict[str, list[float]]:
        return {name: list(getattr(self, name)) for name in SEARCH_SPACE}


@dataclass
class Config:
    """Everything a training run depends on besides the data itself."""

    task: str
    label: str
    population: str
    inputs: list[str] = field(default_factory=lambda: list(INPUT_NAMES))
    # Clinical scores added as model features, computed inside the exported graph (masml.features.SCORES).
    score_features: list[str] = field(default_factory=list)
    test_size: float = 0.25
    folds: int = 5
    seed: int = 0
    min_events: int = 50
    tuning: TuningConfig = field(default_factory=TuningConfig)
    calibration: str = "isotonic"
    thresholds: list[float] = field(default_factory=list)
    mlflow_experiment: str = ""
    registered_model: str = ""
    n_boot: int = 1000
    owner: str = ""
    contact: str = ""
    # Benefit model only (il1_benefit): propensity bounds [low, high] of the overlap region. Patients
    # outside are counted, warned about, trimmed from the trimmed ATE and flagged by a guardrail
    # (Crump et al., Biometrika 2009;96:187-199: the rule of thumb keeps 0.1 <= e(x) <= 0.9).
    overlap: list[float] = field(default_factory=lambda: [0.1, 0.9])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Defaults per task (the configs/*.yaml files restate these, with comments)
# --------------------------------------------------------------------------------------------------

DEFAULTS: dict[str, dict[str, Any]] = {
    "onset": {
        "task": "onset",
        "label": "mas_onset",
        "population": "all",
        "thresholds": [0.1, 0.3, 0.5],
        "mlflow_experiment": "masml-onset",
        "registered_model": "masml-onset",
        "owner": "masml maintainers",
        "contact": "",
        "tuning": {"n_trials": 20},
    },
    "icu": {
        "task": "icu",
        "label": "icu_admission",
        "population": "mas_only",
        "thresholds": [0.3, 0.5, 0.7],
        "mlflow_experiment": "masml-icu",
        "registered_model": "masml-icu",
        "owner": "masml maintainers",
        "contact": "",
        "tuning": {"n_trials": 30},
        # Platt, not isotonic: the ICU model calibrates on ~4,500 MAS patients, where isotonic's step
        # function follows noise. Measured on the default cohort (held-out 1,514): isotonic ECE 0.032,
        # ECE vs the true probabilities 0.014; Platt ECE 0.018, vs truth 0.006, slope 1.03.
        "calibration": "platt",
    },
    # IL-1 blockade benefit (issue 4): the label is the outcome (death within 28 days); the treatment
    # column is fixed (treatment_il1). Three nuisance models are tuned (untreated and treated outcome,
    # propensity), so each gets a smaller trial budget than a risk model.
    "il1_benefit": {
        "task": "il1_benefit",
        "label": "death_28d",
        "population": "mas_only",
        "thresholds": [0.05],
        "mlflow_experiment": "masml-il1-benefit",
        "registered_model": "masml-il1-benefit",
        "owner": "masml maintainers",
        "contact": "",
        "tuning": {"n_trials": 4, "max_rounds": 600},
    },
}


# --------------------------------------------------------------------------------------------------
# Strict checking
# --------------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, int | float)) and not isinstance(v, bool)


def _type_error(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"config key {key!r}: value {value!r} ({type(value).__name__}) is not {expected}")


def _check_keys(raw: dict, allowed: list[str], where: str) -> None:
    for key in raw:
        if key not in allowed:
            name = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"unknown config key {name!r}; allowed keys: {allowed}")


def _want_int(key: str, v: Any, low: int | None = None) -> int:
    if not _is_int(v):
        raise _type_error(key, v, "an int")
    if low is not None and v < low:
        raise ConfigError(f"config key {key!r}: value {v!r} must be >= {low}")
    return v


def _want_str(key: str, v: Any, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(v, str):
        raise _type_error(key, v, "a string")
    if choices is not None and v not in choices:
        raise ConfigError(f"config key {key!r}: value {v!r} is not one of {list(choices)}")
    return v


def _want_prob(key: str, v: Any) -> float:
    if not _is_number(v):
        raise _type_error(key, v, "a number")
    if not 0.0 < float(v) < 1.0:
        raise ConfigError(f"config key {key!r}: value {v!r} must lie strictly between 0 and 1")
    return float(v)


def _want_list(key: str, v: Any) -> list:
    if not isinstance(v, list):
        raise _type_error(key, v, "a list")
    return v


def _check_bounds(name: str, v: Any) -> list:
    key = f"tuning.{name}"
    integer = name in INT_PARAMS
    expected = "a list [low, high] of " + ("ints" if integer else "numbers")
    if not isinstance(v, list) or len(v) != 2 or not all((_is_int if integer else _is_number)(b) for b in v):
        raise _type_error(key, v, expected)
    low, high = v
    if low > high:
        raise ConfigError(f"config key {key!r}: value {v!r} has low > high")
    if name in LOG_SCALE and low <= 0:
        raise ConfigError(f"config key {key!r}: value {v!r} is searched on a log scale, so low must be > 0")
    if name in ("subsample", "colsample_bytree") and not (0 < low and high <= 1):
        raise ConfigError(f"config key {key!r}: value {v!r} must lie in (0, 1]")
    if name == "max_depth" and low < 1:
        raise ConfigError(f"config key {key!r}: value {v!r} must be >= 1")
    if name == "gamma" and low < 0:
        raise ConfigError(f"config key {key!r}: value {v!r} must be >= 0")
    return [int(b) for b in v] if integer else [float(b) for b in v]


def _tuning_from(raw: dict) -> TuningConfig:
    if not isinstance(raw, dict):
        raise _type_error("tuning", raw, "a mapping")
    allowed = [f.name for f in fields(TuningConfig)]
    _check_keys(raw, allowed, "tuning")
    out: dict[str, Any] = {}
    for key, v in raw.items():
        if key in ("n_trials", "max_rounds", "early_stopping_rounds"):
            out[key] = _want_int(f"tuning.{key}", v, low=1)
        elif key == "parallel_trials":
            if not _is_int(v) or v < 1:
                raise ConfigError(f"config key 'tuning.parallel_trials': value {v!r} ({type(v).__name__}) is "
                                  "not a whole number >= 1 (how many tuning trials run at once on a cluster; "
                                  "1 runs them one after another)")  # fmt: skip
            out[key] = v
        elif key == "timeout_s":
            if v is not None and not _is_number(v):
                raise _type_error("tuning.timeout_s", v, "a number of seconds or null")
            if v is not None and v <= 0:
                raise ConfigError(f"config key 'tuning.timeout_s': value {v!r} must be > 0 (or null)")
            out[key] = None if v is None else float(v)
        else:
            out[key] = _check_bounds(key, v)
    return TuningConfig(**out)


def _check_inputs(v: Any) -> list[str]:
    v = _want_list("inputs", v)
    if not v:
        raise ConfigError("config key 'inputs': the list is empty; name at least one model input")
    for name in v:
        if not isinstance(name, str) or name not in INPUT_NAMES:
            why = "a label, not an input" if name in LABEL_NAMES else "not a model input"
            raise ConfigError(f"config key 'inputs': {name!r} is {why}; valid inputs are {list(INPUT_NAMES)}")
    dupes = sorted({n for n in v if v.count(n) > 1})
    if dupes:
        raise ConfigError(f"config key 'inputs': {dupes} listed more than once")
    return list(v)


def _check_score_features(v: Any) -> list[str]:
    from masml.features import SCORES

    v = _want_list("score_features", v)
    for name in v:
        if name not in SCORES:
            raise ConfigError(f"config key 'score_features': {name!r} is not a score feature; "
                              f"available: {sorted(SCORES)}")  # fmt: skip
    if len(set(v)) != len(v):
        raise ConfigError(f"config key 'score_features': {v!r} names a score more than once")
    return list(v)


def _check_overlap(v: Any) -> list[float]:
    bounds = [_want_prob(f"overlap[{i}]", b) for i, b in enumerate(_want_list("overlap", v))]
    if len(bounds) != 2 or bounds[0] >= bounds[1]:
        raise ConfigError(f"config key 'overlap': value {v!r} must be [low, high] with 0 < low < high < 1")
    return bounds


def config_from_dict(raw: dict, task: str | None = None) -> Config:
    """Validate a mapping of overrides and merge it onto the task's defaults."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(raw).__name__}")
    allowed = [f.name for f in fields(Config)]
    _check_keys(raw, allowed, "")
    file_task = raw.get("task")
    if file_task is not None:
        _want_str("task", file_task, TASKS)
    if task is not None and task not in TASKS:
        raise ConfigError(f"task {task!r} is not one of {list(TASKS)}")
    if task is not None and file_task is not None and task != file_task:
        raise ConfigError(f"config key 'task': the file says {file_task!r} but {task!r} was requested")
    task = task or file_task
    if task is None:
        raise ConfigError(f"config key 'task' is missing; set it to one of {list(TASKS)}")

    merged = copy.deepcopy(DEFAULTS[task])
    tuning = {**merged.pop("tuning", {}), **(raw.get("tuning") or {})}
    merged.update({k: v for k, v in raw.items() if k != "tuning"})
    if "tuning" in raw and not isinstance(raw["tuning"], dict | type(None)):
        raise _type_error("tuning", raw["tuning"], "a mapping")

    out: dict[str, Any] = {"tuning": _tuning_from(tuning)}
    for key, v in merged.items():
        if key == "task":
            out[key] = _want_str(key, v, TASKS)
        elif key == "label":
            out[key] = _want_str(key, v)
            if v not in LABEL_NAMES:
                raise ConfigError(f"config key 'label': {v!r} is not a label; labels are {list(LABEL_NAMES)}")
        elif key == "population":
            out[key] = _want_str(key, v, POPULATIONS)
        elif key == "calibration":
            out[key] = _want_str(key, v, CALIBRATIONS)
        elif key in ("mlflow_experiment", "registered_model", "owner", "contact"):
            out[key] = _want_str(key, v)
        elif key == "inputs":
            out[key] = _check_inputs(v)
        elif key == "score_features":
            out[key] = _check_score_features(v)
        elif key == "test_size":
            out[key] = _want_prob(key, v)
        elif key == "folds":
            out[key] = _want_int(key, v, low=2)
        elif key == "seed":
            out[key] = _want_int(key, v, low=0)
        elif key in ("min_events", "n_boot"):
            out[key] = _want_int(key, v, low=1)
        elif key == "thresholds":
            out[key] = [_want_prob(f"thresholds[{i}]", t) for i, t in enumerate(_want_list(key, v))]
        elif key == "overlap":
            out[key] = _check_overlap(v)
    config = Config(**out)
    _check_scores_have_inputs(config)
    return config


def _check_scores_have_inputs(config: Config) -> None:
    from masml.features import SCORES

    for name in config.score_features:
        absent = [n for n in SCORES[name][0] if n not in config.inputs]
        if absent:
            raise ConfigError(f"config key 'score_features': {name!r} is computed from {absent}, which "
                              "'inputs' does not list; add them to 'inputs' or drop the score")  # fmt: skip


def load_config(path: str | Path | None = None, task: str | None = None) -> Config:
    """Settings for a training run: the task's in-code defaults, overridden by the YAML file at ``path``.

    ``path=None`` gives the defaults (identical to ``configs/<task>.yaml``). ``task`` may be omitted when
    the file sets ``task``; when both are given they must agree.
    """
    if path is None:
        if task is None:
            raise ConfigError(f"give a config file or a task ({list(TASKS)})")
        return config_from_dict({}, task)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    try:
        return config_from_dict({} if raw is None else raw, task)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
