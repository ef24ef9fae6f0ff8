"""Guardrails of the IL-1 blockade benefit model: cautions from the literature, shipped as data.

Why data and not code: a clinician must see *why* a benefit estimate should be distrusted or set in
context, and the serving service must return the same cautions without importing masml. So each rule is
a small JSON object in ``manifest["guardrails"]`` in the format of docs/architecture.md ("Guardrails"),
and ``evaluate`` below is the reference evaluator of that format (the server implements the same text;
tests/test_benefit.py checks that every rule fires on every patient it applies to).

Sources are ../shared/docs/clinical-reference.md sections ("ref §N"); thresholds that the reference does
not give are marked Assumption.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

OPS = ("in", "not_in", "<", "<=", ">", ">=", "==")
FIRES, CLEAR, UNKNOWN = "fires", "clear", "unknown"
ICU_SEVERITY_FIELDS = (
    "cns_dysfunction", "hemorrhage", "platelets", "albumin", "mean_arterial_pressure", "lactate"
)


def benefit_guardrails(overlap: Sequence[float]) -> list[dict[str, Any]]:
    """The rules the benefit bundle ships; ``overlap`` = the propensity bounds of the training overlap."""
    low, high = float(overlap[0]), float(overlap[1])
    return [
        {
            "id": "parasitic_or_fungal_trigger",
            "kind": "caution",
            "message": "exclude or treat the infection before immunosuppression",
            "source": (
                "clinical-reference §10 'Potential harm from undiagnosed infection': visceral leishmaniasis "
                "mimics HLH and immunosuppression without antiparasitic treatment is the error (Bode 2014); "
                "opportunistic fungal deaths on anakinra (Phoenix ICU series)"
            ),
            "requires": ["trigger"],
            "any": [{"field": "trigger", "op": "in", "value": ["parasitic_leishmania", "fungal"]}],
        },
        {
            "id": "malignancy_trigger",
            "kind": "caution",
            "message": "disease-specific therapy indicated; IL-1 blockade is not first-line",
            "source": (
                "clinical-reference §10 'Poor or no benefit': malignancy-associated HLH (Eloseily 2020 3/3 "
                "deaths; 42.9 % survival in the IV anakinra review); in lymphoma-associated HLH definitive "
                "chemotherapy is the treatment that matters"
            ),
            "requires": ["trigger"],
            "any": [{"field": "trigger", "op": "in", "value": ["lymphoma", "other_malignancy"]}],
        },
        {
            "id": "outside_overlap",
            "kind": "caution",
            "message": "outside the data this model learned from",
            "source": (
                f"propensity outside [{low}, {high}], the training overlap region (Crump et al., Biometrika "
                "2009;96:187-199, rule of thumb 0.1-0.9): few comparable patients were treated differently"
            ),
            "requires": ["propensity"],
            "any": [
                {"field": "propensity", "op": "<", "value": low},
                {"field": "propensity", "op": ">", "value": high},
            ],
        },
        {
            "id": "icu_level_severity",
            "kind": "context",
            "message": (
                "meets ICU-level criteria: MAS needing intensive care, where treatment goals and urgency "
                "differ from subclinical hyperinflammation"
            ),
            "source": (
                "clinical-reference 'C. Outcome models', ICU need drivers (CNS involvement, haemorrhage, "
                "organ failure) and §9 Birndt 2020 (platelets < 20 x10^9/L, albumin < 20 g/L predicted worse "
                "survival); Assumption: circulatory failure as MAP < 65 mmHg or lactate > 4 mmol/L"
            ),
            # With none of its six fields measured the rule cannot say "clear": nothing was looked at.
            "requires_any": list(ICU_SEVERITY_FIELDS),
            "any": [
                {"field": "cns_dysfunction", "op": "==", "value": 1},
                {"field": "hemorrhage", "op": "==", "value": 1},
                {"field": "platelets", "op": "<", "value": 20},
                {"field": "albumin", "op": "<", "value": 2.0},
                {"field": "mean_arterial_pressure", "op": "<", "value": 65},
                {"field": "lactate", "op": ">", "value": 4},
            ],
        },
    ]


def _missing(values: pd.Series) -> np.ndarray:
    return values.isna().to_numpy()


def _condition(values: pd.Series, op: str, target: Any) -> np.ndarray:
    """A condition per patient; a missing value is False (docs/architecture.md)."""
    if op not in OPS:
        raise ValueError(f"guardrail op {op!r} is not one of {list(OPS)}")
    miss = _missing(values)
    if op in ("in", "not_in"):
        hit = values.astype(object).isin(list(target)).to_numpy()
        out = hit if op == "in" else ~hit
    else:
        v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
        with np.errstate(invalid="ignore"):
            out = {
                "<": v < target,
                "<=": v <= target,
                ">": v > target,
                ">=": v >= target,
                "==": v == target,
            }[op]
    return np.asarray(out, bool) & ~miss


def evaluate(
    rules: Sequence[Mapping[str, Any]], frame: pd.DataFrame, outputs: Mapping[str, np.ndarray] | None = None
) -> pd.DataFrame:
    """One column per rule id: "fires", "clear" or "unknown" (a field in ``requires`` is missing, or
    every field in ``requires_any`` is).

    ``frame`` holds the inputs in canonical units (categories by label); ``outputs`` the graph's outputs.
    """
    fields = {c: frame[c].reset_index(drop=True) for c in frame.columns}
    for name, v in (outputs or {}).items():
        fields[name] = pd.Series(np.asarray(v, dtype=float).reshape(-1))
    result = {}
    for rule in rules:
        if "any" not in rule and "all" not in rule:
            raise ValueError(f"guardrail {rule.get('id')!r} needs 'any' or 'all' conditions")
        fired = np.ones(len(frame), bool)
        for mode in ("any", "all"):  # both given: both parts must hold (docs/architecture.md, serve/)
            if mode not in rule:
                continue
            conds = []
            for c in rule[mode]:
                if c["field"] not in fields:
                    raise KeyError(
                        f"guardrail {rule['id']!r} reads {c['field']!r}: neither an input nor an output"
                    )
                conds.append(_condition(fields[c["field"]], c["op"], c["value"]))
            stacked = np.vstack(conds)
            fired &= stacked.any(axis=0) if mode == "any" else stacked.all(axis=0)
        unknown = np.zeros(len(frame), bool)
        for name in [*rule.get("requires", []), *rule.get("requires_any", [])]:
            if name not in fields:
                raise KeyError(
                    f"guardrail {rule['id']!r} requires {name!r}, which is neither an input nor an output"
                )
        for name in rule.get("requires", []):
            unknown |= _missing(fields[name])
        if rule.get("requires_any"):
            unknown |= np.logical_and.reduce([_missing(fields[n]) for n in rule["requires_any"]])
        result[rule["id"]] = np.where(unknown, UNKNOWN, np.where(fired, FIRES, CLEAR))
    return pd.DataFrame(result, index=range(len(frame)))


def summary_column(status: pd.DataFrame) -> pd.Series:
    """Per patient, the ids of fired rules joined by ';' (unknown ones as 'id?'), '' when none apply."""
    parts = []
    for _, row in status.iterrows():
        ids = [k for k, v in row.items() if v == FIRES] + [f"{k}?" for k, v in row.items() if v == UNKNOWN]
        parts.append(";".join(ids))
    return pd.Series(parts, index=status.index, dtype=object)
