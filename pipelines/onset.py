"""MAS onset: P(MAS present or developing within 7 days) for any hospitalised patient with suspected
hyperinflammation. Settings: configs/onset.yaml."""

from __future__ import annotations

from pipelines.risk import RiskRunResult, run_risk_pipeline


def run(data_path, out_dir, **options) -> RiskRunResult:
    return run_risk_pipeline("onset", data_path, out_dir, **options)
