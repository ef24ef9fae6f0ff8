"""The ``masml`` command line: one program, a sub-command per job, each with ``--help``.

Commands stay thin: they parse arguments, call one library function and print. Anything a data
scientist might script lives in the library, not here.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from masml import __version__

app = typer.Typer(
    name="masml",
    help="Clinical risk models for macrophage activation syndrome: data, scores, training, serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals could hold patient rows
)
console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 140)  # logs and CI keep full tables

DEFAULT_COHORT = Path("data/cohort.parquet")

CLUSTER_HELP = (
    "Run on a Dask cluster: 'local' (a LocalCluster of 2 worker processes), 'local:N' (N workers) or a "
    "scheduler address (tcp://host:8786). --data is then Parquet: a file or a folder of them."
)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    )  # fmt: skip


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _simulate_with_progress(n: int, seed: int):
    from masml.cohort import simulate

    with _progress() as bar:
        task = bar.add_task(f"simulating {n:,} patients", total=n)
        return simulate(n, seed=seed, on_progress=lambda have: bar.update(task, completed=min(have, n)))


@app.command()
def cohort(
    n: int = typer.Option(20_000, "--n", min=1, help="Number of patients."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed and n give the same cohort."),
    out_path: Path = typer.Option(
        DEFAULT_COHORT, "--out", help="Output file, .csv or .parquet; or a folder (no extension) of "
        "Parquet partitions, for --cluster."
    ),
    partitions: int = typer.Option(8, "--partitions", min=1, help="Files in an --out folder."),
) -> None:
    """Write a synthetic cohort (model inputs + labels) and, beside it, its ground truth (FILE.truth.EXT)."""
    from masml.cohort import write_cohort

    c = _simulate_with_progress(n, seed)
    try:
        data_path, truth_path = write_cohort(c, out_path, partitions=1 if out_path.suffix else partitions)
    except (FileExistsError, ValueError) as err:
        _fail(str(err))
    _print_summary(c.data, c.truth)
    out.print(f"cohort: {data_path}\nground truth: {truth_path}")


@app.command()
def score(
    file: Path = typer.Argument(..., help="Dataset in masml's schema (.csv or .parquet)."),
    units: Path | None = typer.Option(None, "--units", help="YAML file of the dataset's local units."),
    out_path: Path = typer.Option(..., "--out", help="Output file with every clinical score added."),
) -> None:
    """Add every clinical score (HScore, HLH-2004, 2016 criteria, MS score, DIC, ...) as columns."""
    from masml.io import load_dataset, write_table
    from masml.scores import add_scores

    frame = _load(file, units, load_dataset)
    write_table(add_scores(frame), out_path)
    out.print(f"scores for {len(frame):,} patients: {out_path}")


@app.command()
def validate(
    file: Path = typer.Argument(..., help="Dataset in masml's schema (.csv or .parquet)."),
    units: Path | None = typer.Option(None, "--units", help="YAML file of the dataset's local units."),
) -> None:
    """Check a dataset against the schema and report every problem at once (exit code 1 if any)."""
    from masml.io import load_dataset

    frame = _load(file, units, load_dataset)
    for note in frame.attrs.get("validation_notes", []):
        out.print(f"note: {note}")
    out.print(f"valid: {len(frame):,} patients, {frame.shape[1]} columns")


class Task(StrEnum):
    onset = "onset"
    icu = "icu"
    il1_benefit = "il1_benefit"


@app.command()
def train(
    task: Task = typer.Argument(
        ..., help="Which model: onset (MAS onset), icu (ICU need) or il1_benefit (IL-1 blockade benefit)."
    ),
    data: Path = typer.Option(..., "--data", help="Training data in masml's schema (.csv or .parquet)."),
    units: Path | None = typer.Option(None, "--units", help="YAML file of the dataset's local units."),
    config: Path | None = typer.Option(None, "--config", help="YAML settings (default: configs/TASK.yaml)."),
    out_dir: Path = typer.Option(..., "--out", help="Bundle folder to write (model.onnx + manifest.json)."),
    cluster: str | None = typer.Option(None, "--cluster", help=CLUSTER_HELP),
) -> None:
    """Train, evaluate, explain and export one model; track the run in MLflow."""
    options = {"units": units, "config_path": config}
    if cluster is not None:
        options["cluster"] = cluster
    result = _train(task.value, data, out_dir, **options)
    _print_result(task.value, result)
    out.print(f"bundle: {result.bundle_dir}")


@app.command()
def predict(
    bundle: Path = typer.Argument(..., help="Bundle folder (model.onnx + manifest.json)."),
    data: Path = typer.Option(..., "--data", help="Patients in masml's schema (.csv or .parquet)."),
    units: Path | None = typer.Option(None, "--units", help="YAML file of the dataset's local units."),
    out_path: Path = typer.Option(
        ..., "--out", help="File to write (.csv or .parquet): patient_id and the model's outputs; with "
        "--cluster, a new folder of Parquet files, one per input partition."
    ),
    cluster: str | None = typer.Option(None, "--cluster", help=CLUSTER_HELP),
) -> None:
    """Score patients from the bundle alone, through onnxruntime."""
    from masml.bundle import BundleError
    from masml.io import load_dataset, write_table
    from masml.predict import predict_frame

    if cluster is not None:
        from masml.distributed.predict import predict_partitioned

        result = _on_cluster(cluster, "batch scoring", lambda client: predict_partitioned(
            client, bundle, data, out_path, units))  # fmt: skip
        out.print(f"scored {result.rows:,} patients in {result.partitions} partitions: {result.out_dir}")
        return
    frame = _load(data, units, load_dataset)
    try:
        scored = predict_frame(bundle, frame)
    except BundleError as err:
        _fail(str(err))
    write_table(scored.drop(columns=["margin"], errors="ignore"), out_path)
    out.print(f"scored {len(scored):,} patients: {out_path}")


@app.command()
def main(
    n: int = typer.Option(20_000, "--n", min=1, help="Patients in the default cohort."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    data_dir: Path = typer.Option(Path("data"), "--data-dir", help="Where the cohort is written."),
    models_dir: Path = typer.Option(Path("models"), "--models-dir", help="Where bundles are written."),
    config_dir: Path | None = typer.Option(None, "--config-dir", help="Folder of TASK.yaml settings."),
) -> None:
    """The main job: generate the default cohort, train every model on it, export bundles, compare."""
    data_path = data_dir / "cohort.parquet"
    cohort(n=n, seed=seed, out_path=data_path, partitions=1)
    for task in ("onset", "icu", "il1_benefit"):
        config = config_dir / f"{task}.yaml" if config_dir else None
        result = _train(task, data_path, models_dir / task, config_path=config)
        _print_result(task, result)
        out.print(f"{task} bundle: {result.bundle_dir}")


def _on_cluster(spec: str, what: str, job):
    """Connect, run ``job(client)``, and turn cluster and data failures into messages and exit codes."""
    from masml.distributed.cluster import ClusterError, connect
    from masml.units import UnitError
    from masml.validation import SchemaValidationError

    try:
        with console.status(f"{what} on the cluster ({spec})..."), connect(spec) as client:
            return job(client)
    except SchemaValidationError as err:
        console.print(str(err), highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(code=1) from None
    except (ClusterError, UnitError, FileNotFoundError, FileExistsError, ValueError) as err:
        _fail(str(err))


def _train(task: str, data: Path, out_dir: Path, **options):
    from masml.config import ConfigError
    from masml.distributed.cluster import ClusterError
    from masml.onnx_export import ParityError
    from masml.tracking import TrackingServerUnreachable
    from masml.training import TrainingDataError
    from masml.units import UnitError
    from masml.validation import SchemaValidationError
    from pipelines.il1_benefit import run_il1_benefit_pipeline
    from pipelines.risk import run_risk_pipeline

    try:
        with console.status(f"training {task}..."):
            log = lambda m: console.print(m, highlight=False)  # noqa: E731
            if task == Task.il1_benefit:
                return run_il1_benefit_pipeline(data, out_dir, log=log, **options)
            return run_risk_pipeline(task, data, out_dir, log=log, **options)
    except SchemaValidationError as err:
        console.print(str(err), highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(code=1) from None
    except (ConfigError, TrainingDataError, UnitError, ParityError, FileNotFoundError, ClusterError,
            TrackingServerUnreachable) as err:  # fmt: skip
        _fail(str(err))


def _print_result(task: str, result) -> None:
    if task == Task.il1_benefit:
        _print_benefit(result)
    else:
        _print_comparison(task, result.comparison)


def _print_benefit(result) -> None:
    """The benefit model's held-out summary: learner choice, average effect, uplift, policy values."""
    r = result.report
    table = Table(title="il1_benefit: held-out summary", show_header=False)
    ate = r["ate_aipw"]
    rows = [
        ("learner (out-of-fold DR loss, one-SE rule)", r["selection"]["chosen"]),
        ("AIPW average benefit [95% CI]", _ci(ate)),
        ("outside overlap (held-out)", f"{r['overlap']['test']['n_outside']} of {r['overlap']['test']['n']}"),
        ("calibration slope (BLP)", _cell(r["calibration_slope"])),
        ("AUTOC [95% CI]", _ci(r["uplift"]["autoc"])),
        ("Qini coefficient [95% CI]", _ci(r["uplift"]["qini"])),
        ("ONNX parity max |Δ|", f"{result.parity['max_abs_diff']:.1e}"),
    ]
    truth = r.get("truth")
    if truth:
        d = truth["deaths_per_100"]
        rows += [
            ("PEHE / PEHE of the average effect",
             f"{truth['pehe']:.4f} / {truth['pehe_constant_true_mean']:.4f} = {truth['pehe_ratio']:.2f}"),
            ("correlation with true benefit", _cell(truth["correlation"])),
            ("deaths/100: model policy (benefit > 0)", f"{d['model']:.2f}"),
            ("deaths/100: treat all / treat none", f"{d['treat_all']:.2f} / {d['treat_none']:.2f}"),
            ("deaths/100: true-benefit policy", f"{d['true_benefit']:.2f}"),
        ]  # fmt: skip
    for k, v in rows:
        table.add_row(k, v)
    out.print(table)


def _ci(m: dict) -> str:
    return f"{m['estimate']:+.4f} [{m['ci_low']:+.4f}, {m['ci_high']:+.4f}]"


def _print_comparison(task: str, comparison) -> None:
    """Held-out metrics side by side; Δ is the AUROC gap to the ceiling (true probabilities), if known."""
    table = Table(
        title=f"{task}: held-out performance (95% bootstrap CI)",
        caption="ECE floor: the ECE a perfectly calibrated model would show on this many patients; "
        "ECE vs truth: against the true probabilities (synthetic data only)",
    )
    columns = ("model", "n", "AUROC [95% CI]", "Δ ceiling", "AUPRC", "Brier", "slope [95% CI]",
               "ECE [95% CI]", "ECE floor", "ECE vs truth")  # fmt: skip
    for name in columns:
        table.add_column(name, no_wrap=True)
    for _, r in comparison.iterrows():
        get = r.get
        table.add_row(
            str(get("model")),
            str(int(get("rows", 0))),
            _with_ci(get, "auroc"),
            _cell(get("auroc_diff")),
            _cell(get("auprc")),
            _cell(get("brier")),
            _with_ci(get, "calibration_slope"),
            _with_ci(get, "ece"),
            _cell(get("ece_floor")),
            _cell(get("ece_vs_truth")),
        )
    out.print(table)


def _with_ci(get, metric: str) -> str:
    """``estimate [lo, hi]``; the estimate alone where the metric has no interval (a score's ECE)."""
    est, lo, hi = _cell(get(metric)), _cell(get(f"{metric}_lo")), _cell(get(f"{metric}_hi"))
    return f"{est} [{lo}, {hi}]" if est and lo and hi else est


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if value != value else f"{value:.3f}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return "" if value is None else str(value)


@app.command()
def serve(
    models: Path = typer.Option(Path("models"), "--models", help="Folder of bundles (one per sub-folder)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (off loopback: keys needed)."),
    port: int = typer.Option(8000, "--port"),
    workers: int = typer.Option(1, "--workers", min=1),
    api_keys_file: Path | None = typer.Option(
        None, "--api-keys-file", help="Lines 'KEY role' or 'sha256:HEX role' (role: user or admin)."
    ),
    audit_log: Path | None = typer.Option(None, "--audit-log", help="Audit log file (JSON lines)."),
    public_metrics: bool = typer.Option(
        False, "--public-metrics", help="Answer /metrics without an API key (aggregates, no patient data)."
    ),
) -> None:
    """Start the scoring service (serve/, onnxruntime only) on every bundle in --models."""
    args = [sys.executable, "-m", "serve", "--models", str(models), "--host", host, "--port", str(port),
            "--workers", str(workers)]  # fmt: skip
    args += ["--api-keys-file", str(api_keys_file)] if api_keys_file else []
    args += ["--audit-log", str(audit_log)] if audit_log else []
    args += ["--public-metrics"] if public_metrics else []
    import os

    os.execv(sys.executable, args)  # the service never runs inside masml's (training) interpreter state


@app.command()
def report(
    source: str = typer.Argument(..., help="A bundle folder (with card.json) or an MLflow run id."),
    out_path: Path = typer.Option(..., "--out", help="File to write: .html, .pdf (needs Chromium) or .json."),
) -> None:
    """Regenerate a model card from its bundle or its MLflow run (the numbers are never recomputed)."""
    import tempfile

    from masml import card

    if out_path.suffix.lower() not in (".html", ".htm", ".pdf", ".json"):
        _fail(f"--out {str(out_path)!r}: the file name must end in .html, .pdf or .json")
    folder = Path(source)
    try:
        if folder.is_dir():
            card_json = folder / "card.json"
            if not card_json.is_file():
                _fail(f"{folder} holds no card.json: is it a bundle written by masml train?")
            written = card.render(card_json, out_path)
        else:
            import mlflow

            from masml.tracking import tracking_uri

            with tempfile.TemporaryDirectory() as tmp:
                try:
                    local = mlflow.artifacts.download_artifacts(
                        run_id=source, artifact_path="card/card.json", dst_path=tmp,
                        tracking_uri=tracking_uri(),
                    )  # fmt: skip
                except Exception as err:  # MlflowException, or an unknown run id on a server
                    _fail(f"{source!r} is neither a bundle folder nor a run with a card in {tracking_uri()}: "
                          f"{str(err)[:300]}")  # fmt: skip
                written = card.render(local, out_path)
    except (RuntimeError, ValueError) as err:
        _fail(str(err))
    out.print(f"model card: {written}")


@app.command()
def version() -> None:
    """Print masml's version."""
    out.print(__version__)


def _load(file: Path, units: Path | None, load_dataset):
    from masml.units import UnitError
    from masml.validation import SchemaValidationError

    try:
        return load_dataset(file, units)
    except SchemaValidationError as err:
        console.print(str(err), highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(code=1) from None
    except (UnitError, FileNotFoundError, ValueError) as err:
        _fail(str(err))


def _print_summary(data, truth) -> None:
    from masml.summary import cohort_summary

    s = cohort_summary(data, truth)
    table = Table(title="cohort summary", show_header=False)
    rows = [
        ("patients", f"{s['patients']:,}"),
        ("MAS (present or within 7 days)", f"{s['mas_prevalence']:.1%}"),
        ("children (< 16 y)", f"{s['children_share']:.1%}"),
        ("median age", f"{s['age_median']:.0f} y"),
        ("ICU within 7 days (MAS)", f"{s['icu_rate_mas']:.1%}"),
        ("IL-1 blockade within 48 h (MAS)", f"{s['il1_treated_rate_mas']:.1%}"),
        ("death within 28 days (MAS)", f"{s['death_28d_rate_mas']:.1%}"),
    ]
    rows += [(f"trigger family: {k}", f"{v:.1%}") for k, v in s["trigger_family_share"].items()]
    if "ceiling_auroc_onset" in s:
        rows += [
            ("ceiling AUROC, onset (true probabilities)", f"{s['ceiling_auroc_onset']:.3f}"),
            ("ceiling AUROC, ICU (true probabilities)", f"{s['ceiling_auroc_icu']:.3f}"),
            ("mean true benefit of IL-1 blockade (MAS)", f"{s['mean_true_benefit']:+.3f}"),
            ("share harmed by IL-1 blockade (MAS)", f"{s['share_harmed_by_il1']:.1%}"),
        ]
    for k, v in rows:
        table.add_row(k, v)
    out.print(table)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
