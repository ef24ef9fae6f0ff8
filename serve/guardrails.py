"""Guardrail rules shipped as data in the manifest (docs/architecture.md §4), evaluated per patient.

Why data and not code: the clinical cautions (e.g. "treat the infection before immunosuppression") must
travel with the model version they were reviewed for, and a server must apply them without knowing the
model. Why vectorised: rules run on every batch; a 1,000-patient request must not pay a Python loop per
patient per condition.

Semantics: a rule fires when any (``any``) or every (``all``) of its conditions holds (both lists given:
both parts must hold). A condition on a missing value is false; a rule that lists ``requires`` reports
``"unknown"`` for a patient missing any of those fields, and one that lists ``requires_any`` for a patient
missing all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

OPS = ("in", "not_in", "<", "<=", ">", ">=", "==")


@dataclass(frozen=True)
class Condition:
    field: str
    op: str
    value: Any


@dataclass(frozen=True)
class Rule:
    id: str
    message: str
    source: str | None
    any: tuple[Condition, ...]
    all: tuple[Condition, ...]
    requires: tuple[str, ...]
    kind: str | None = None
    requires_any: tuple[str, ...] = ()


class Guardrails:
    """Compiled rules of one manifest; ``fields`` maps a field name to how to fetch it."""

    def __init__(
        self, rules: list[dict], categories: dict[str, list[str]], inputs: list[str], outputs: set[str]
    ) -> None:
        self.categories = categories
        self.input_index = {n: j for j, n in enumerate(inputs)}
        self.rules: list[Rule] = []
        known = set(inputs) | outputs
        self.needed_outputs: set[str] = set()
        if not isinstance(rules, list):
            raise ValueError("guardrails must be a list of rules")
        seen = set()
        for k, r in enumerate(rules):
            where = f"guardrails[{k}]"
            if not isinstance(r, dict) or not isinstance(r.get("id"), str) or not r.get("message"):
                raise ValueError(f"{where}: a rule needs a string id and a message")
            if r["id"] in seen:
                raise ValueError(f"{where}: duplicate rule id {r['id']!r}")
            seen.add(r["id"])
            parts = {}
            for key in ("any", "all"):
                conds = []
                for c in r.get(key) or []:
                    if not isinstance(c, dict) or set(c) != {"field", "op", "value"}:
                        raise ValueError(f"{where}.{key}: a condition is {{field, op, value}}, got {c!r}")
                    if c["field"] not in known:
                        raise ValueError(f"{where}: unknown field {c['field']!r}")
                    if c["op"] not in OPS:
                        raise ValueError(f"{where}: unknown op {c['op']!r}; expected one of {OPS}")
                    if c["op"] in ("in", "not_in") and not isinstance(c["value"], list):
                        raise ValueError(f"{where}: op {c['op']!r} needs a list value")
                    if c["field"] in categories:
                        vals = c["value"] if isinstance(c["value"], list) else [c["value"]]
                        unknown = [v for v in vals if v not in categories[c["field"]]]
                        if unknown:
                            raise ValueError(f"{where}: {unknown} are not categories of {c['field']}")
                    if c["field"] not in self.input_index:
                        self.needed_outputs.add(c["field"])
                    conds.append(Condition(c["field"], c["op"], c["value"]))
                parts[key] = tuple(conds)
            if not parts["any"] and not parts["all"]:
                raise ValueError(f"{where}: a rule needs an 'any' or an 'all' list of conditions")
            requires = tuple(r.get("requires") or ())
            requires_any = tuple(r.get("requires_any") or ())
            for f in requires + requires_any:
                if f not in known:
                    raise ValueError(f"{where}: requires unknown field {f!r}")
                if f not in self.input_index:
                    self.needed_outputs.add(f)
            self.rules.append(
                Rule(
                    r["id"],
                    str(r["message"]),
                    r.get("source"),
                    parts["any"],
                    parts["all"],
                    requires,
                    r.get("kind"),
                    requires_any,
                )
            )

    def _column(self, name: str, x: np.ndarray, outputs: dict[str, np.ndarray]) -> np.ndarray:
        if name in self.input_index:
            return x[:, self.input_index[name]]
        return np.asarray(outputs[name], dtype=np.float64).reshape(-1)

    def _holds(self, c: Condition, x: np.ndarray, outputs: dict[str, np.ndarray]) -> np.ndarray:
        col = self._column(c.field, x, outputs)
        present = ~np.isnan(col)
        if c.field in self.categories:  # compare labels through their index
            cats = self.categories[c.field]
            vals = c.value if isinstance(c.value, list) else [c.value]
            codes = np.array([cats.index(v) for v in vals], dtype=np.float64)
            if c.op in ("in", "=="):
                hit = np.isin(col, codes)
            elif c.op == "not_in":
                hit = ~np.isin(col, codes)
            else:  # ordering of labels has no meaning
                hit = np.zeros(len(col), dtype=bool)
            return hit & present
        with np.errstate(invalid="ignore"):
            if c.op == "in":
                hit = np.isin(col, np.asarray(c.value, dtype=np.float64))
            elif c.op == "not_in":
                hit = ~np.isin(col, np.asarray(c.value, dtype=np.float64))
            else:
                v = float(c.value)
                hit = {"<": col < v, "<=": col <= v, ">": col > v, ">=": col >= v, "==": col == v}[c.op]
        return hit & present

    def evaluate(self, x: np.ndarray, outputs: dict[str, np.ndarray]) -> list[list[dict]]:
        """Per patient, every rule with its status: ``fires``, ``clear`` or ``unknown`` (as masml says)."""
        n = x.shape[0]
        columns: list[tuple[Rule, np.ndarray, np.ndarray]] = []
        for rule in self.rules:
            fired = np.ones(n, dtype=bool)
            if rule.any:
                anyhit = np.zeros(n, dtype=bool)
                for c in rule.any:
                    anyhit |= self._holds(c, x, outputs)
                fired &= anyhit
            for c in rule.all:
                fired &= self._holds(c, x, outputs)
            unknown = np.zeros(n, dtype=bool)
            for f in rule.requires:
                unknown |= np.isnan(self._column(f, x, outputs))
            if rule.requires_any:
                absent = [np.isnan(self._column(f, x, outputs)) for f in rule.requires_any]
                unknown |= np.logical_and.reduce(absent)
            columns.append((rule, fired, unknown))
        out: list[list[dict]] = [[] for _ in range(n)]
        for rule, fired, unknown in columns:
            status = np.where(unknown, "unknown", np.where(fired, "fires", "clear")).tolist()
            for i in range(n):
                flag = {"id": rule.id, "status": status[i], "message": rule.message}
                if rule.kind:
                    flag["kind"] = rule.kind
                out[i].append(flag)
        return out
