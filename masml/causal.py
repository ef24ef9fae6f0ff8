"""Who gains from IL-1 blockade (anakinra): individual benefit estimated from observational data.

Estimand (issue 4): for a MAS patient with inputs x, benefit(x) = P(death within 28 d | x, no IL-1
blockade) - P(death within 28 d | x, IL-1 blockade). Positive = fewer deaths with treatment. Treatment
in the data was chosen by indication; the estimate is causal only under **no unmeasured confounding**
(an assumption, stated in the manifest), plus overlap, which is checked and reported here.

Why this design (the numbers behind it: ../shared/docs/design-notes.md, "Benefit from IL-1 blockade"):

* **Nuisance models** are the risk pipeline's tuned, calibrated xgboost models (``training.tune_and_fit``):
  P(death | x) fitted separately on untreated and on treated patients (mu0, mu1), and the propensity
  P(treated | x) (e). All three are tree ensembles that ``masml.onnx_benefit`` exports, so the bundle's
  ``risk_untreated`` / ``risk_treated`` / ``propensity`` are exactly these models. Their out-of-fold
  (cross-fitted) predictions feed the learners below, so no patient's pseudo-outcome uses a model that
  saw that patient's outcome.
* **Learners**, all on the benefit scale: a constant (the AIPW average effect), the T-learner
  (mu0 - mu1), the X-learner (Kuenzel et al., PNAS 2019;116:4156), a DR-learner with an xgboost final
  stage (Kennedy, arXiv:2004.14497) and a DR-learner whose final stage is a ridge regression on
  *effect modifiers the clinical literature names* (clinical-reference §7, §8, §10 "Who benefits";
  simulator guidance "C. Outcome models"): the trigger, septic MAS features (ferritin > 4420, PROVIDE;
  HBD + DIC, Shakoory), each interacting with the patient's own untreated risk (effects are reported as
  hazard ratios, which act on baseline risk, ref "C"). The design notes measured flexible final stages
  as worse than a constant on samples of this size, and this parsimonious stage as best.
* **Selection needs no ground truth**: each learner's out-of-fold predictions are scored by the DR
  pseudo-outcome loss mean((phi - tau)^2) on the training patients (its expectation differs from the
  PEHE^2 only by a term that is the same for every learner, when the nuisances are cross-fitted and the
  propensity is right); the R-loss (Nie & Wager, Biometrika 2021;108:299) is reported beside it. The
  one-standard-error rule then takes the simplest learner within one SE of the lowest loss, so that on a
  small sample the noise in the pseudo-outcomes does not pick a flexible learner (at 2,000 patients the
  constant is chosen; at 20,000 the effect-modifier DR-learner).
* **Overlap**: propensities outside ``config.overlap`` (default [0.1, 0.9], Crump et al., Biometrika
  2009;96:187) are counted, warned about, trimmed from the trimmed ATE and flagged per patient by a
  guardrail; pseudo-outcomes clip e to the same bounds (so no patient gets a weight above 1/0.1 = 10).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from masml import features
from masml.config import Config
from masml.evaluation import wilson_interval
from masml.schema import TRIGGERS
from masml.scores import HBD_BILIRUBIN_MG_DL, HBD_DIC_INR, HBD_DIC_PLATELETS, HBD_TRANSAMINASE, MALS_FERRITIN
from masml.training import NTHREAD, TrainedRiskModel, TrainingDataError, _binary, cv_folds, tune_and_fit

TREATMENT = "treatment_il1"
OUTCOME = "death_28d"
# In order of complexity (number of effectively free parameters), simplest first: the one-standard-error
# rule below prefers the earliest learner whose loss is statistically indistinguishable from the best.
LEARNERS = ("constant", "dr_ridge", "t_learner", "x_learner", "dr_forest")

# Septic MAS features as effect modifiers (clinical-reference §7-8): ferritin > 4420 ng/mL (PROVIDE,
# Kyriazopoulou 2017) or HBD + DIC (Shakoory 2016). The HBD and DIC lab cut-offs are masml's operational
# assumptions from masml/scores.py; the graph uses the platelets + INR branch of DIC only (the ISTH-score
# branch is not ONNX-exact in float32): an approximation, acceptable because it only defines a basis
# function whose coefficient the DR final stage estimates from the data.

MODIFIER_INPUTS = ("trigger", "ferritin", "bilirubin", "alt", "ast", "platelets", "inr")
SEPSIS_FEATURES_GROUP = "bacterial_sepsis+mas_features"
GROUPS = (*TRIGGERS, SEPSIS_FEATURES_GROUP)

# Ridge penalties tried for the effect-modifier final stage (chosen by the out-of-fold DR loss).
RIDGE_LAMBDAS = (1.0, 10.0, 100.0, 1000.0)
# Fixed settings of the small regression forests (X-learner, DR forest): shallow and heavily regularised
# because their targets (pseudo-outcomes, imputed effects) are very noisy. Assumptions, not tuned.
FOREST_PARAMS = {
    "objective": "reg:squarederror",
    "max_depth": 2,
    "eta": 0.05,
    "min_child_weight": 30.0,
    "subsample": 0.8,
    "reg_lambda": 10.0,
    "tree_method": "hist",
    "nthread": NTHREAD,
    "verbosity": 0,
}
FOREST_ROUNDS = 150
# Assumption: overlap is called poor when more than 10 % of patients fall outside the overlap bounds.
POOR_OVERLAP_SHARE = 0.10


# --------------------------------------------------------------------------------------------------
# Data checks
# --------------------------------------------------------------------------------------------------


def treatment_values(frame: pd.DataFrame) -> np.ndarray:
    """The treatment column as float 0/1/NaN; refuses a missing column or any other value, with examples."""
    if TREATMENT not in frame.columns:
        raise TrainingDataError(
            f"the treatment column {TREATMENT!r} is missing from the data; the benefit model needs 0/1 "
            "(IL-1 blockade within 48 h) per MAS patient"
        )
    return _binary(frame, TREATMENT).to_numpy(dtype=float)  # the label check: 0/1 or empty


def check_arms(t: np.ndarray, y: np.ndarray, folds: int) -> dict[str, int]:
    """Both arms must exist and hold deaths and survivors for cross-fitting; counts per arm and outcome."""
    counts = {
        f"{arm}_{outcome}": int(np.sum((t == a) & (y == o)))
        for a, arm in ((0, "untreated"), (1, "treated"))
        for o, outcome in ((1, "deaths"), (0, "survivors"))
    }
    for a, arm in ((0, "untreated"), (1, "treated")):
        n = int(np.sum(t == a))
        if n == 0:
            raise TrainingDataError(
                f"no {arm} patients ({TREATMENT} == {a}) among {len(t)} patients: a treatment effect "
                "needs patients in both arms"
            )
        for outcome in ("deaths", "survivors"):
            if counts[f"{arm}_{outcome}"] < folds:
                raise TrainingDataError(
                    f"the {arm} arm ({TREATMENT} == {a}) has {counts[f'{arm}_{outcome}']} {outcome} "
                    f"({OUTCOME}); {folds}-fold cross-fitting needs at least {folds}"
                )
    return counts


# --------------------------------------------------------------------------------------------------
# Nuisance models (tuned, calibrated, exportable)
# --------------------------------------------------------------------------------------------------


@dataclass
class Nuisances:
    """mu0 (death if untreated), mu1 (death if treated), e (propensity): risk-pipeline models."""

    untreated: TrainedRiskModel
    treated: TrainedRiskModel
    propensity: TrainedRiskModel

    def __post_init__(self) -> None:
        # One feature spec for all three (tune_and_fit builds it from the config's inputs and
        # score_features): the learners' final stages and the export reuse it (``spec``).
        names = ("untreated", "treated", "propensity")
        specs = {name: list(getattr(self, name).spec) for name in names}
        if any(specs[name] != specs["untreated"] for name in names):
            raise ValueError(
                "the nuisance models were trained on different features: "
                + "; ".join(f"{name}: {features.feature_names(spec)}" for name, spec in specs.items())
            )
        inputs = {name: list(getattr(self, name).input_names) for name in names}
        if any(inputs[name] != inputs["untreated"] for name in names):
            raise ValueError(f"the nuisance models were trained on different inputs: {inputs}")

    @property
    def spec(self) -> list[features.Feature]:
        """The feature spec the nuisances were trained on (the config's inputs and score_features)."""
        return list(self.untreated.spec)

    @property
    def input_names(self) -> list[str]:
        return list(self.untreated.input_names)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (
            self.untreated.predict_risk(x),
            self.treated.predict_risk(x),
            self.propensity.predict_risk(x),
        )


def fit_nuisances(
    x: np.ndarray,
    y: np.ndarray,
    t: np.ndarray,
    groups: np.ndarray,
    input_names: Sequence[str],
    config: Config,
    log: Callable[[str], None] = print,
) -> tuple[Nuisances, dict[str, np.ndarray]]:
    """Tune and fit the three nuisance models; return them and their cross-fitted predictions.

    Cross-fitted: mu0 on untreated patients is its out-of-fold prediction, on treated patients (never
    in its training data) the full model's; mu1 the mirror image; e out of fold for everyone.
    """
    fitted = {}
    for name, rows, label in (
        ("untreated", t == 0, y),
        ("treated", t == 1, y),
        ("propensity", np.ones(len(t), bool), t),
    ):
        fitted[name] = tune_and_fit(
            x[rows], label[rows], groups[rows], input_names, config,
            on_trial=lambda r, n=name: log(f"  {n} trial {r['number']}: CV log loss {r['value']:.4f}"),
        )  # fmt: skip
    nuis = Nuisances(**fitted)
    r0, r1, e = nuis.predict(x)
    r0[t == 0] = nuis.untreated.oof_risk
    r1[t == 1] = nuis.treated.oof_risk
    e = nuis.propensity.oof_risk.copy()
    return nuis, {"r0": r0, "r1": r1, "e": e}


def pseudo_outcome(
    y: np.ndarray, t: np.ndarray, r0: np.ndarray, r1: np.ndarray, e: np.ndarray, bounds: Sequence[float]
) -> np.ndarray:
    """Doubly robust (AIPW) score of the benefit, on the benefit scale (untreated minus treated deaths).

    phi = (mu0 - mu1) + (1 - T)(Y - mu0)/(1 - e) - T(Y - mu1)/e, with e clipped to the overlap bounds.
    Its mean is the AIPW average effect; regressed on x it gives the DR-learner.
    """
    e = np.clip(e, bounds[0], bounds[1])
    return (r0 - r1) + (1 - t) * (y - r0) / (1 - e) - t * (y - r1) / e


# --------------------------------------------------------------------------------------------------
# Effect modifiers and final stages
# --------------------------------------------------------------------------------------------------


def modifier_matrix(x: np.ndarray, input_names: Sequence[str]) -> np.ndarray:
    """One column per effect-modifier group (``GROUPS``): the trigger one-hot and septic MAS features.

    Computed from the float32 input matrix with comparisons only, exactly as the ONNX graph does.
    """
    index = {n: i for i, n in enumerate(input_names)}
    missing = [n for n in MODIFIER_INPUTS if n not in index]
    if missing:
        raise ValueError(
            f"the benefit model's effect modifiers need the inputs {missing}; add them to inputs"
        )
    x = np.asarray(x, dtype=np.float32)
    col = {n: x[:, index[n]] for n in MODIFIER_INPUTS}
    h = np.zeros((len(x), len(GROUPS)), dtype=np.float64)
    for k in range(len(TRIGGERS)):
        h[:, k] = col["trigger"] == np.float32(k)
    h[:, len(TRIGGERS)] = septic_mas_features(col)
    return h


def septic_mas_features(col: dict[str, np.ndarray]) -> np.ndarray:
    """Bacterial sepsis with ferritin > 4420 or (HBD and platelets < 100 with INR >= 1.5); NaN -> False."""
    f32 = np.float32
    sepsis = col["trigger"] == f32(TRIGGERS.index("bacterial_sepsis"))
    hbd = (
        (col["bilirubin"] >= f32(HBD_BILIRUBIN_MG_DL))
        | (col["alt"] >= f32(HBD_TRANSAMINASE))
        | (col["ast"] >= f32(HBD_TRANSAMINASE))
    )
    dic = (col["platelets"] < f32(HBD_DIC_PLATELETS)) & (col["inr"] >= f32(HBD_DIC_INR))
    return sepsis & ((col["ferritin"] > f32(MALS_FERRITIN)) | (hbd & dic))


def ridge_basis(h: np.ndarray, r0: np.ndarray) -> np.ndarray:
    """[1, r0, r0^2] pooled, then each group column times [1, r0, r0^2] (group deviations)."""
    r0 = np.asarray(r0, dtype=np.float64)[:, None]
    pooled = np.hstack([np.ones_like(r0), r0, r0 * r0])
    return np.hstack([pooled, h, h * r0, h * r0 * r0])


@dataclass
class RidgeStage:
    """benefit = basis(h, r0) @ coef; the 3 pooled terms are unpenalised, group deviations penalised."""

    coef: np.ndarray
    lam: float

    def predict(self, h: np.ndarray, r0: np.ndarray) -> np.ndarray:
        return ridge_basis(h, r0) @ self.coef


def fit_ridge(h: np.ndarray, r0: np.ndarray, phi: np.ndarray, lam: float) -> RidgeStage:
    z = ridge_basis(h, r0)
    return ridge_from_sums(z.T @ z, z.T @ phi, lam)


def ridge_from_sums(zz: np.ndarray, zphi: np.ndarray, lam: float) -> RidgeStage:
    """The ridge stage from Z'Z and Z'phi, which add up over partitions (how a cluster fits it)."""
    penalty = np.full(zz.shape[0], lam)
    penalty[:3] = 1e-8  # pooled terms: (numerically) unpenalised
    return RidgeStage(coef=np.linalg.solve(zz + np.diag(penalty), zphi), lam=float(lam))


def fit_forest(f: np.ndarray, target: np.ndarray, seed: int):
    """A small regression forest on the feature matrix (fixed settings, see FOREST_PARAMS)."""
    import xgboost as xgb

    d = xgb.DMatrix(np.asarray(f, np.float32), label=np.asarray(target, np.float64), nthread=NTHREAD)
    return xgb.train({**FOREST_PARAMS, "seed": seed}, d, num_boost_round=FOREST_ROUNDS)


def _forest_predict(booster, f: np.ndarray) -> np.ndarray:
    return np.asarray(booster.inplace_predict(np.asarray(f, np.float32), predict_type="margin"), np.float64)


# --------------------------------------------------------------------------------------------------
# The benefit model (what the graph computes, in Python)
# --------------------------------------------------------------------------------------------------


@dataclass
class BenefitModel:
    """Nuisances + the selected learner's final stage. ``predict`` is the Python twin of the graph."""

    nuisances: Nuisances
    learner: str
    input_names: list[str]
    spec: list[features.Feature]
    constant: float = 0.0
    ridge: RidgeStage | None = None
    dr_forest: Any = None
    x_tau0: Any = None  # X-learner: effect imputed on untreated patients
    x_tau1: Any = None  # X-learner: effect imputed on treated patients

    def __post_init__(self) -> None:
        check_one_spec(self)

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Input matrix -> benefit, risk_untreated, risk_treated, propensity (float64)."""
        x = np.asarray(x, dtype=np.float32)
        r0, r1, e = self.nuisances.predict(x)
        if self.learner == "constant":
            tau = np.full(len(x), self.constant)
        elif self.learner == "t_learner":
            tau = r0 - r1
        elif self.learner == "dr_ridge":
            assert self.ridge is not None
            tau = self.ridge.predict(modifier_matrix(x, self.input_names), r0)
        elif self.learner == "dr_forest":
            tau = _forest_predict(self.dr_forest, features.transform(x, self.spec))
        elif self.learner == "x_learner":
            f = features.transform(x, self.spec)
            tau = e * _forest_predict(self.x_tau0, f) + (1 - e) * _forest_predict(self.x_tau1, f)
        else:
            raise ValueError(f"unknown learner {self.learner!r}; expected one of {list(LEARNERS)}")
        return {"benefit": tau, "risk_untreated": r0, "risk_treated": r1, "propensity": e}


def check_one_spec(model: BenefitModel) -> None:
    """Every sub-model of the benefit model sees the same features: the nuisances' spec (the config's
    inputs and score_features), which the final-stage forests are fitted on and the graph computes once
    for all of them. Raises ValueError naming both feature lists otherwise (``fit_final`` cannot build
    such a model; this guards hand-built or edited ones before predicting or exporting)."""
    nuis = model.nuisances
    if list(model.input_names) != nuis.input_names:
        raise ValueError(
            f"the benefit model's inputs {list(model.input_names)} differ from its nuisance models' "
            f"{nuis.input_names}"
        )
    if list(model.spec) != nuis.spec:
        raise ValueError(
            f"the benefit model's features {features.feature_names(model.spec)} differ from those its "
            f"nuisance models were trained on {features.feature_names(nuis.spec)} (score_features "
            "included); every sub-model and the exported graph must use one feature spec"
        )


@dataclass
class BenefitTraining:
    """The fitted benefit model and what its diagnostics, export and card need, whichever engine trained
    it: one process (``pipelines.il1_benefit``) or a Dask cluster (``masml.distributed.benefit``), whose
    workers keep the rows and send back only counts and per-patient numbers."""

    model: BenefitModel
    selection: Selection
    population: Any  # training.PopulationReport of the population step (before the treatment filter)
    skipped_treatment: int  # population rows with no treatment recorded: left out, counted
    arms: dict[str, int]  # deaths and survivors per arm (``check_arms``)
    test: pd.DataFrame  # held-out patients: at least patient_id, the label, the treatment, trigger
    prediction: dict[str, np.ndarray]  # the model's outputs for them (``BenefitModel.predict``)
    guardrail_status: pd.DataFrame  # one column per guardrail, one row per held-out patient
    truth: pd.DataFrame | None  # the simulator's truth for them (synthetic data only)
    x_check: np.ndarray  # held-out input rows for the graph's and explainer's gates and the champion score
    check_rows: np.ndarray  # their positions among the held-out patients
    train_t: np.ndarray  # treatment of every training patient
    train_e: np.ndarray  # their cross-fitted propensity (overlap)
    phi_train: np.ndarray  # their cross-fitted pseudo-outcomes (AIPW average effect on training)
    balance: pd.DataFrame  # ``balance_table`` on the training patients
    train_description: dict
    test_description: dict
    training_data: dict
    split: str
    log_dataset: Callable[[], None]


@dataclass
class Selection:
    """Out-of-fold losses of every learner (no ground truth used) and the choice they made."""

    losses: pd.DataFrame  # learner, dr_loss, dr_loss_minus_best, se_of_difference, r_loss
    chosen: str
    best: str  # lowest DR loss (the choice when no simpler learner is within one SE of it)
    ridge_lambda: float
    oof: dict[str, np.ndarray] = field(default_factory=dict)


def select_learner(
    x: np.ndarray,
    y: np.ndarray,
    t: np.ndarray,
    groups: np.ndarray,
    cross: dict[str, np.ndarray],
    phi: np.ndarray,
    input_names: Sequence[str],
    config: Config,
    spec: Sequence[features.Feature],
) -> Selection:
    """Every learner's out-of-fold benefit over K patient-grouped folds, scored by the DR loss.

    ``spec``: the nuisances' feature spec (``Nuisances.spec``), on which the forests are fitted, as
    ``fit_final`` fits them.
    """
    r0, r1, e = cross["r0"], cross["r1"], cross["e"]
    f = features.transform(x, list(spec))
    h = modifier_matrix(x, input_names)
    n = len(y)
    oof = {name: np.zeros(n) for name in ("constant", "x_learner", "dr_forest")}
    oof["t_learner"] = r0 - r1
    ridge_oof = {lam: np.zeros(n) for lam in RIDGE_LAMBDAS}
    for tr, va in cv_folds(t, groups, config.folds, config.seed):
        oof["constant"][va] = phi[tr].mean()
        for lam in RIDGE_LAMBDAS:
            ridge_oof[lam][va] = fit_ridge(h[tr], r0[tr], phi[tr], lam).predict(h[va], r0[va])
        oof["dr_forest"][va] = _forest_predict(fit_forest(f[tr], phi[tr], config.seed), f[va])
        tau0, tau1 = _x_learner_fit(f[tr], y[tr], t[tr], r0[tr], r1[tr], config.seed)
        oof["x_learner"][va] = e[va] * _forest_predict(tau0, f[va]) + (1 - e[va]) * _forest_predict(
            tau1, f[va]
        )
    return choose_learner(oof, ridge_oof, phi, y, t, cross, config.overlap)


def choose_learner(
    oof: dict[str, np.ndarray],
    ridge_oof: dict[float, np.ndarray],
    phi: np.ndarray,
    y: np.ndarray,
    t: np.ndarray,
    cross: dict[str, np.ndarray],
    overlap: Sequence[float],
) -> Selection:
    """Out-of-fold benefits of every learner (the ridge's per lambda) -> the loss table and the choice.

    ``select_learner``'s last step, on per-patient numbers only: a cluster computes the out-of-fold
    predictions where the rows lie and brings these here (``masml.distributed.benefit``).
    """
    oof = dict(oof)
    ridge_loss = {lam: float(np.mean((phi - p) ** 2)) for lam, p in ridge_oof.items()}
    best_lam = min(RIDGE_LAMBDAS, key=lambda lam: (ridge_loss[lam], lam))
    oof["dr_ridge"] = ridge_oof[best_lam]
    sq = {name: (phi - oof[name]) ** 2 for name in LEARNERS}
    losses, chosen, best = one_se_choice(sq)
    ec = np.clip(cross["e"], *overlap)
    m = ec * cross["r1"] + (1 - ec) * cross["r0"]  # outcome regression marginal over treatment
    # R-loss on the death scale: the effect of treatment on death is -benefit.
    losses["r_loss"] = [float(np.mean(((y - m) - (t - ec) * (-oof[name])) ** 2)) for name in LEARNERS]
    return Selection(losses=losses, chosen=chosen, best=best, ridge_lambda=best_lam, oof=oof)


def selection_lines(selection: Selection, task: str) -> list[str]:
    """The learner choice as log lines (the same on one process and on a cluster)."""
    lines = [f"{task}: learner chosen: {selection.chosen} (lowest out-of-fold DR loss: {selection.best})"]
    for _, row in selection.losses.iterrows():
        lines.append(f"  {row['learner']:<10} DR loss {row['dr_loss']:.5f}  R-loss {row['r_loss']:.5f}")
    return lines


def one_se_choice(sq: dict[str, np.ndarray]) -> tuple[pd.DataFrame, str, str]:
    """Per-patient squared errors per learner (in ``LEARNERS`` order, simplest first) -> the loss table,
    the chosen learner and the one with the lowest loss.

    One-standard-error rule (Hastie, Tibshirani & Friedman, Elements of Statistical Learning, 2nd ed.,
    section 7.10): the simplest learner whose mean loss is within one SE of the best one's; the SE is that
    of the paired per-patient difference. Pseudo-outcomes are very noisy, and on small samples the noise
    alone can make a flexible learner look best.
    """
    names = list(sq)
    best = min(names, key=lambda name: float(np.mean(sq[name])))
    rows = []
    for name in names:
        diff = sq[name] - sq[best]
        n = len(diff)
        rows.append(
            {
                "learner": name,
                "dr_loss": float(np.mean(sq[name])),
                "dr_loss_minus_best": float(np.mean(diff)),
                "se_of_difference": float(np.std(diff, ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
            }
        )
    losses = pd.DataFrame(rows)
    within = losses["dr_loss_minus_best"] <= losses["se_of_difference"]
    return losses, str(losses.loc[within, "learner"].iloc[0]), best


def _x_learner_fit(f, y, t, r0, r1, seed: int):
    """Kuenzel 2019 X-learner on the benefit scale: imputed benefit on untreated (Y - mu1) and treated
    (mu0 - Y) patients, each regressed on x."""
    untreated, treated = t == 0, t == 1
    tau0 = fit_forest(f[untreated], y[untreated] - r1[untreated], seed)
    tau1 = fit_forest(f[treated], r0[treated] - y[treated], seed)
    return tau0, tau1


def fit_final(
    learner: str,
    nuis: Nuisances,
    x: np.ndarray,
    y: np.ndarray,
    t: np.ndarray,
    cross: dict[str, np.ndarray],
    phi: np.ndarray,
    input_names: Sequence[str],
    ridge_lambda: float,
    seed: int,
) -> BenefitModel:
    """The chosen learner's final stage refitted on every training patient, on the nuisances' features
    (the config's inputs and score_features): one feature spec for every sub-model and the graph."""
    spec = nuis.spec
    model = BenefitModel(nuisances=nuis, learner=learner, input_names=list(input_names), spec=spec)
    f = features.transform(x, spec)
    if learner == "constant":
        model.constant = float(phi.mean())
    elif learner == "dr_ridge":
        model.ridge = fit_ridge(modifier_matrix(x, input_names), cross["r0"], phi, ridge_lambda)
    elif learner == "dr_forest":
        model.dr_forest = fit_forest(f, phi, seed)
    elif learner == "x_learner":
        model.x_tau0, model.x_tau1 = _x_learner_fit(f, y, t, cross["r0"], cross["r1"], seed)
    elif learner != "t_learner":
        raise ValueError(f"unknown learner {learner!r}; expected one of {list(LEARNERS)}")
    return model


# --------------------------------------------------------------------------------------------------
# Diagnostics: overlap, balance, average effect, calibration, uplift
# --------------------------------------------------------------------------------------------------


def overlap_report(e: np.ndarray, t: np.ndarray, bounds: Sequence[float]) -> dict[str, Any]:
    """Propensity quantiles by arm, patients outside the overlap bounds, and a warning when poor."""
    low, high = bounds
    below, above = int(np.sum(e < low)), int(np.sum(e > high))
    share = (below + above) / max(len(e), 1)
    q = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
    by_arm = {
        arm: {f"q{int(p * 100):02d}": float(np.quantile(e[t == a], p)) for p in q}
        for a, arm in ((0, "untreated"), (1, "treated"))
        if np.any(t == a)
    }
    warning = ""
    if share > POOR_OVERLAP_SHARE:
        warning = (
            f"poor overlap: {below + above} of {len(e)} patients ({share:.1%}) have a propensity outside "
            f"[{low}, {high}]; their benefit estimates extrapolate beyond comparable patients in the "
            "other arm"
        )
    return {
        "bounds": [float(low), float(high)],
        "n": int(len(e)),
        "n_below": below,
        "n_above": above,
        "n_outside": below + above,
        "share_outside": float(share),
        "by_arm": by_arm,
        "warning": warning,
    }


def _weighted_mean_var(v: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    ok = ~np.isnan(v)
    if ok.sum() < 2 or w[ok].sum() <= 0:
        return np.nan, np.nan
    m = float(np.average(v[ok], weights=w[ok]))
    return m, float(np.average((v[ok] - m) ** 2, weights=w[ok]))


def balance_table(
    f: np.ndarray, names: Sequence[str], t: np.ndarray, e: np.ndarray, bounds: Sequence[float]
) -> pd.DataFrame:
    """Standardised mean differences (treated - untreated) per feature, before and after inverse
    propensity weighting (Austin, Stat Med 2009;28:3083: |SMD| < 0.1 is the usual balance threshold).

    The denominator is the unweighted pooled SD in both columns, so the two are comparable; missing
    values are left out feature by feature.
    """
    ec = np.clip(e, *bounds)
    w = np.where(t == 1, 1 / ec, 1 / (1 - ec))
    rows = []
    for j, name in enumerate(names):
        v = f[:, j].astype(np.float64)
        m1, v1 = _weighted_mean_var(v[t == 1], np.ones(int(np.sum(t == 1))))
        m0, v0 = _weighted_mean_var(v[t == 0], np.ones(int(np.sum(t == 0))))
        sd = np.sqrt((v1 + v0) / 2) if np.isfinite(v1 + v0) else np.nan
        wm1, _ = _weighted_mean_var(v[t == 1], w[t == 1])
        wm0, _ = _weighted_mean_var(v[t == 0], w[t == 0])
        ok = sd > 0 if np.isfinite(sd) else False
        rows.append(
            {
                "feature": name,
                "smd_before": (m1 - m0) / sd if ok else np.nan,
                "smd_after": (wm1 - wm0) / sd if ok else np.nan,
            }
        )
    return pd.DataFrame(rows)


def aipw(phi: np.ndarray) -> dict[str, float]:
    """AIPW average effect (mean DR score) with its influence-function 95 % CI."""
    n = len(phi)
    est = float(np.mean(phi))
    se = float(np.std(phi, ddof=1) / np.sqrt(n)) if n > 1 else np.nan
    return {"estimate": est, "se": se, "ci_low": est - 1.96 * se, "ci_high": est + 1.96 * se, "n": int(n)}


def calibration_by_group(tau: np.ndarray, phi: np.ndarray, groups: int = 5) -> pd.DataFrame:
    """Patients in ``groups`` quantile groups of predicted benefit: mean predicted vs observed DR effect."""
    order = np.argsort(tau, kind="mergesort")
    rows = []
    for k, idx in enumerate(np.array_split(order, groups)):
        if len(idx) == 0:
            continue
        obs = aipw(phi[idx])
        rows.append(
            {
                "group": k + 1,
                "n": int(len(idx)),
                "predicted": float(np.mean(tau[idx])),
                "observed": obs["estimate"],
                "observed_ci_low": obs["ci_low"],
                "observed_ci_high": obs["ci_high"],
            }
        )
    return pd.DataFrame(rows)


def calibration_slope(tau: np.ndarray, phi: np.ndarray) -> float:
    """Slope of phi on centred predicted benefit (the BLP heterogeneity coefficient of Chernozhukov et
    al., "Generic machine learning inference on heterogeneous treatment effects", 2018): 1 = well
    calibrated spread, 0 = no detectable heterogeneity. NaN when predicted benefit does not vary (the
    constant learner): its centred values are then rounding noise (the mean of n equal floats need not
    equal them exactly), and a slope on them would be a meaningless number."""
    tau = np.asarray(tau, dtype=np.float64)
    if tau.size == 0 or np.ptp(tau) <= 1e-12 * max(1.0, float(np.max(np.abs(tau)))):
        return np.nan
    c = tau - tau.mean()
    denom = float(np.sum(c * c))
    return float(np.sum(c * (phi - phi.mean())) / denom) if denom > 0 else np.nan


def calibration_slope_ci(tau: np.ndarray, phi: np.ndarray) -> dict[str, float]:
    """:func:`calibration_slope` with its influence-function (heteroskedasticity-robust) 95 % CI.

    Why this interval: the slope is an ordinary least-squares coefficient of the held-out DR scores on
    centred predicted benefit, so, like the AIPW mean (:func:`aipw`), it is a smooth function of
    per-patient averages and has an influence function, psi_i = c_i (phi_i - mean phi - slope c_i) /
    mean(c^2); its variance estimate is the HC1 sandwich, sum(psi^2) / (n (n - 2)) (the robust standard
    error Chernozhukov et al. use for this coefficient). The held-out patients played no part in
    fitting the model or its nuisances, so predicted benefit is a fixed function of x here. NaN (with
    no interval) when predicted benefit does not vary (the constant learner).
    """
    tau, phi = np.asarray(tau, dtype=np.float64), np.asarray(phi, dtype=np.float64)
    n = len(tau)
    est = calibration_slope(tau, phi)
    nan = float("nan")
    out = {"estimate": est, "se": nan, "ci_low": nan, "ci_high": nan, "n": int(n)}
    if not np.isfinite(est) or n < 3:
        return out
    c = tau - tau.mean()
    psi = c * (phi - phi.mean() - est * c) / np.mean(c * c)
    se = float(np.sqrt(np.sum(psi * psi) / (n * (n - 2))))
    return {**out, "se": se, "ci_low": est - 1.96 * se, "ci_high": est + 1.96 * se}


def toc_curve(tau: np.ndarray, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """u = share treated (top by predicted benefit), TOC(u) = mean DR score in the top u - ATE, and the
    Qini gain G(u) = u * mean DR score in the top u (benefit per patient of treating only the top u)."""
    order = np.argsort(-tau, kind="mergesort")
    cum = np.cumsum(phi[order])
    k = np.arange(1, len(phi) + 1)
    u = k / len(phi)
    return u, cum / k - phi.mean(), cum / len(phi)


def uplift_metrics(tau: np.ndarray, phi: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """RATE (Yadlowsky et al., JASA 2025, "Evaluating treatment prioritization rules via rank-weighted
    average treatment effects"): AUTOC = mean over u of TOC(u), Qini coefficient = mean of u * TOC(u);
    AUUC = area under the Qini gain curve. Patient-bootstrap percentile 95 % CIs."""

    def stats(tt: np.ndarray, pp: np.ndarray) -> np.ndarray:
        u, toc, gain = toc_curve(tt, pp)
        return np.array([np.mean(toc), np.mean(u * toc), np.mean(gain)])

    point = stats(tau, phi)
    rng = np.random.default_rng(seed)
    reps = np.array(
        [stats(tau[i], phi[i]) for i in (rng.integers(0, len(tau), len(tau)) for _ in range(n_boot))]
    )
    lo, hi = np.percentile(reps, [2.5, 97.5], axis=0)
    return {
        name: {"estimate": float(point[j]), "ci_low": float(lo[j]), "ci_high": float(hi[j])}
        for j, name in enumerate(("autoc", "qini", "auuc"))
    }


def benefit_by_group(tau: np.ndarray, phi: np.ndarray, group: np.ndarray, truth=None) -> pd.DataFrame:
    """Per group (e.g. trigger family): patients, mean predicted benefit, observed DR effect with its CI,
    and the mean true benefit when the data carries it: where the model's heterogeneity comes from."""
    rows = []
    for level in sorted({str(g) for g in group}):
        m = np.asarray([str(g) == level for g in group])
        obs = aipw(phi[m])
        row = {
            "group": level,
            "n": int(m.sum()),
            "predicted": float(np.mean(tau[m])),
            "observed": obs["estimate"],
            "observed_ci_low": obs["ci_low"],
            "observed_ci_high": obs["ci_high"],
        }
        if truth is not None:
            row["true"] = float(np.mean(np.asarray(truth, float)[m]))
        rows.append(row)
    return pd.DataFrame(rows)


def _dr_potential_outcomes(y, t, r0, r1, e, bounds) -> tuple[np.ndarray, np.ndarray]:
    """Per patient, doubly robust scores of death if treated (y1) and if untreated (y0)."""
    ec = np.clip(e, *bounds)
    return r1 + t * (y - r1) / ec, r0 + (1 - t) * (y - r0) / (1 - ec)


def policy_value_dr(tau: np.ndarray, y: np.ndarray, t: np.ndarray, r0, r1, e, bounds) -> dict[str, float]:
    """Deaths per 100 patients under "treat if predicted benefit > 0", treat-all and treat-none,
    estimated without ground truth (doubly robust potential-outcome scores)."""
    y1, y0 = _dr_potential_outcomes(y, t, r0, r1, e, bounds)
    d = tau > 0
    return {
        "model": float(100 * np.mean(np.where(d, y1, y0))),
        "treat_all": float(100 * np.mean(y1)),
        "treat_none": float(100 * np.mean(y0)),
        "share_treated_by_model": float(np.mean(d)),
    }


def policy_value_dr_ci(tau: np.ndarray, y: np.ndarray, t: np.ndarray, r0, r1, e, bounds) -> dict[str, dict]:
    """:func:`policy_value_dr`'s numbers, same keys, each with its 95 % CI.

    * ``model``, ``treat_all``, ``treat_none`` (deaths per 100): each is the mean of a per-patient
      doubly robust score (100 x y1, 100 x y0, or whichever the policy picks), exactly as the AIPW
      average effect is the mean of phi, so each gets :func:`aipw`'s influence-function interval
      (estimate +- 1.96 SD / sqrt(n)): ``{"estimate", "se", "ci_low", "ci_high", "n"}``. The policy
      (predicted benefit > 0) is fixed: the model never saw the held-out patients.
    * ``share_treated_by_model``: the proportion of held-out patients with predicted benefit > 0, a
      binomial proportion, so the Wilson score interval (:func:`masml.evaluation.wilson_interval`), as
      for the risk models' sensitivities: ``{"estimate", "treated", "n", "ci_low", "ci_high"}``.
    """
    y1, y0 = _dr_potential_outcomes(y, t, r0, r1, e, bounds)
    d = np.asarray(tau) > 0
    treated, n = int(d.sum()), int(len(d))
    lo, hi = wilson_interval(treated, n) if n else (float("nan"), float("nan"))
    return {
        "model": aipw(100 * np.where(d, y1, y0)),
        "treat_all": aipw(100 * y1),
        "treat_none": aipw(100 * y0),
        "share_treated_by_model": {
            "estimate": float(np.mean(d)) if n else float("nan"),
            "treated": treated,
            "n": n,
            "ci_low": float(lo),
            "ci_high": float(hi),
        },
    }


def truth_metrics(tau: np.ndarray, truth: pd.DataFrame, ate_estimate: float) -> dict[str, Any]:
    """Against the simulator's ground truth: PEHE (root mean squared error of the benefit) beside the
    PEHE of predicting one average effect for everyone, correlation, and deaths per 100 under each
    policy computed from the true death probabilities (expected deaths, not sampled ones)."""
    true_tau = truth["true_benefit"].to_numpy(float)
    p0 = truth["true_p_death_untreated"].to_numpy(float)
    p1 = truth["true_p_death_treated"].to_numpy(float)
    pehe = float(np.sqrt(np.mean((tau - true_tau) ** 2)))
    const_true = float(np.sqrt(np.mean((true_tau.mean() - true_tau) ** 2)))
    const_est = float(np.sqrt(np.mean((ate_estimate - true_tau) ** 2)))

    def deaths(d: np.ndarray) -> float:
        return float(100 * np.mean(np.where(d, p1, p0)))

    policy = {
        "model": deaths(tau > 0),
        "treat_all": deaths(np.ones(len(tau), bool)),
        "treat_none": deaths(np.zeros(len(tau), bool)),
        "true_benefit": deaths(true_tau > 0),
    }
    return {
        "pehe": pehe,
        "pehe_constant_true_mean": const_true,
        "pehe_constant_estimated_ate": const_est,
        "pehe_ratio": pehe / const_true if const_true > 0 else np.nan,
        "correlation": float(np.corrcoef(tau, true_tau)[0, 1]) if np.std(tau) > 0 else np.nan,
        "true_ate": float(true_tau.mean()),
        "deaths_per_100": policy,
        "policy_gap_to_true_benefit": policy["model"] - policy["true_benefit"],
        "policy_gain_vs_treat_all": policy["treat_all"] - policy["model"],
    }
