"""ICU need: P(ICU admission within 7 days) for a patient with MAS. Settings: configs/icu.yaml."""

from __future__ import annotations

from pipelines.risk import RiskRunResult, run_risk_pipeline


def run(data_path, out_dir, **options) -> RiskRunResult:
    return run_risk_pipeline("icu", data_path, out_dir, **options)
