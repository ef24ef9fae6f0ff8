"""Prometheus metrics, written as exposition text by hand.

Why not prometheus_client: the service keeps its dependencies to the scoring path; a few counters and
histograms in dicts cost microseconds per request and no lock (one event loop per process). With several
workers each process exposes its own series (scrape each, or run one worker per container).
"""

from __future__ import annotations

import bisect
from collections import defaultdict

import numpy as np

LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
RISK_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
BENEFIT_BUCKETS = (-0.2, -0.1, -0.05, -0.02, 0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def observe_many(self, values: np.ndarray) -> None:
        if len(values) <= 8:  # one patient: numpy's unique costs more than a loop
            for v in values.tolist():
                if v == v:
                    self.observe(v)
            return
        values = values[~np.isnan(values)]
        idx = np.searchsorted(self.buckets, values, side="left")
        for i, c in zip(*np.unique(idx, return_counts=True), strict=True):
            self.counts[int(i)] += int(c)
        self.sum += float(values.sum())
        self.count += len(values)


def _labels(d: dict[str, str]) -> str:
    def esc(v: str) -> str:
        return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in d.items()) + "}" if d else ""


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple, int] = defaultdict(int)  # (endpoint, model, status)
        self.latency: dict[tuple, Histogram] = {}  # (endpoint, model)
        self.errors: dict[str, int] = defaultdict(int)  # kind
        self.patients: dict[str, int] = defaultdict(int)  # model
        self.explained: dict[str, int] = defaultdict(int)  # model
        self.missing: dict[tuple, int] = defaultdict(int)  # (model, input)
        self.predictions: dict[tuple, Histogram] = {}  # (model, output)
        self.guardrails: dict[tuple, int] = defaultdict(int)  # (model, rule, status)
        self._missing_keys: dict[str, tuple[list[str], list[tuple]]] = {}  # model -> (names, keys)

    def request(self, endpoint: str, model: str, status: int, seconds: float) -> None:
        self.requests[(endpoint, model, str(status))] += 1
        h = self.latency.get((endpoint, model))
        if h is None:
            h = self.latency[(endpoint, model)] = Histogram(LATENCY_BUCKETS)
        h.observe(seconds)

    def error(self, kind: str) -> None:
        self.errors[kind] += 1

    def scored(self, model: str, names: list[str], x: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
        """Drift signals: how often each input is missing, and where predictions fall."""
        self.patients[model] += x.shape[0]
        cached = self._missing_keys.get(model)
        if cached is None or cached[0] is not names:  # a reloaded model brings a new list of names
            cached = self._missing_keys[model] = (names, [(model, n) for n in names])
        keys = cached[1]
        one = x.shape[0] == 1
        if one:  # one patient: plain loops over 35 floats cost less than numpy's reductions
            missing = self.missing
            for key, v in zip(keys, x[0].tolist(), strict=True):
                if v != v:
                    missing[key] += 1
        else:
            counts = np.isnan(x).sum(axis=0)
            for j in np.flatnonzero(counts).tolist():
                self.missing[keys[j]] += int(counts[j])
        for out, values in outputs.items():
            h = self.predictions.get((model, out))
            if h is None:
                h = self.predictions[(model, out)] = Histogram(
                    BENEFIT_BUCKETS if out == "benefit" else RISK_BUCKETS
                )
            if one:
                v = float(values[0])
                if v == v:
                    h.observe(v)
            else:
                h.observe_many(np.asarray(values, dtype=np.float64))

    def render(self, models: dict[str, list[str]]) -> str:
        lines: list[str] = []

        def head(name: str, kind: str, text: str) -> None:
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")

        head("masml_requests_total", "counter", "Requests by endpoint, model and HTTP status.")
        for (ep, m, st), v in sorted(self.requests.items()):
            lines.append(f"masml_requests_total{_labels({'endpoint': ep, 'model': m, 'status': st})} {v}")
        head("masml_request_duration_seconds", "histogram", "Server-side request latency.")
        for (ep, m), h in sorted(self.latency.items()):
            self._hist(lines, "masml_request_duration_seconds", {"endpoint": ep, "model": m}, h)
        head("masml_errors_total", "counter", "Client and server errors by kind.")
        for kind, v in sorted(self.errors.items()):
            lines.append(f"masml_errors_total{_labels({'kind': kind})} {v}")
        head("masml_patients_scored_total", "counter", "Patients scored per model.")
        for m, v in sorted(self.patients.items()):
            lines.append(f"masml_patients_scored_total{_labels({'model': m})} {v}")
        head("masml_patients_explained_total", "counter", "Patients explained (SHAP) per model.")
        for m, v in sorted(self.explained.items()):
            lines.append(f"masml_patients_explained_total{_labels({'model': m})} {v}")
        head(
            "masml_input_missing_total",
            "counter",
            "Missing values per model input (divide by masml_patients_scored_total for the missing rate).",
        )
        for m, names in sorted(models.items()):
            for name in names:
                lines.append(
                    f"masml_input_missing_total{_labels({'model': m, 'input': name})} "
                    f"{self.missing.get((m, name), 0)}"
                )
        head("masml_prediction", "histogram", "Distribution of each output, for drift monitoring.")
        for (m, out), h in sorted(self.predictions.items()):
            self._hist(lines, "masml_prediction", {"model": m, "output": out}, h)
        head("masml_guardrail_total", "counter", "Guardrail outcomes per rule.")
        for (m, rule, st), v in sorted(self.guardrails.items()):
            lines.append(f"masml_guardrail_total{_labels({'model': m, 'rule': rule, 'status': st})} {v}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def _hist(lines: list[str], name: str, labels: dict[str, str], h: Histogram) -> None:
        acc = 0
        for b, c in zip(h.buckets, h.counts, strict=False):
            acc += c
            lines.append(f"{name}_bucket{_labels(labels | {'le': repr(float(b))})} {acc}")
        lines.append(f"{name}_bucket{_labels(labels | {'le': '+Inf'})} {h.count}")
        lines.append(f"{name}_sum{_labels(labels)} {h.sum!r}")
        lines.append(f"{name}_count{_labels(labels)} {h.count}")
