"""The model card in a real browser: headless Chromium renders it, prints it to PDF, and it is not blank.

Chromium comes from Debian's ``chromium`` package; when it is missing the test installs it with apt-get
(CI runs as root on a clean machine). The screenshot is kept in ``test-artifacts/`` for a human to look at.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from masml import card

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
HEADINGS = (
    "Model details",
    "Intended use",
    "Training and evaluation data",
    "Performance on held-out patients",
    "Subgroups",
    "Explanations (SHAP)",
    "Limitations",
    "Monitoring plan",
    "TRIPOD+AI checklist",
    "Sign-off",
)


def _ensure_chromium() -> None:
    if card.chromium():
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.fail("Chromium is missing and cannot be installed here (needs apt-get as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True, timeout=600)
    done = subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True,
                          text=True, timeout=1200)  # fmt: skip
    assert done.returncode == 0 and card.chromium(), done.stderr[-2000:]


@pytest.fixture(scope="module")
def card_files(tmp_path_factory):
    """A real card: a tiny onset run on a small cohort, without tracking."""
    from masml.cohort import simulate, write_cohort
    from masml.config import config_from_dict
    from pipelines.risk import run_risk_pipeline

    _ensure_chromium()
    tmp = tmp_path_factory.mktemp("card")
    data, _ = write_cohort(simulate(2_000, seed=41), tmp / "cohort.parquet")
    tiny = {"tuning": {"n_trials": 1, "max_rounds": 80}, "folds": 2, "n_boot": 50}
    config = config_from_dict(tiny, "onset")
    return run_risk_pipeline("onset", data, tmp / "bundle", config=config, log=lambda m: None, track=False)


def test_card_renders_in_headless_chromium_with_headings_and_figures(card_files):
    bundle = card_files.bundle_dir
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "model_card.png"
    shot.unlink(missing_ok=True)
    page = (bundle / "card.html").resolve().as_uri()
    card.run_chromium(["--window-size=1200,2400", "--hide-scrollbars", f"--screenshot={shot}", page])
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2400, 1200)
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.01  # text and figures, not a blank page
    dom = subprocess.run([card.chromium(), *card.CHROMIUM_FLAGS, "--dump-dom", page], capture_output=True,
                         text=True, timeout=120).stdout  # fmt: skip
    for heading in HEADINGS:
        assert f">{heading}</h2>" in dom.replace("&amp;", "&"), heading
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', dom)
    assert {"roc", "precision recall", "calibration", "decision curve", "SHAP summary"} <= set(images)


def test_card_pdf_is_printed_with_every_section(card_files):
    pdf = card_files.bundle_dir / "card.pdf"
    assert pdf.is_file(), "the pipeline prints the PDF when Chromium is available"
    data = pdf.read_bytes()
    assert data[:5] == b"%PDF-" and len(data) > 50_000
    assert len(re.findall(rb"/Type\s*/Page[^s]", data)) >= 4  # a multi-page document, not an error page
    saved = json.loads((card_files.bundle_dir / "card.json").read_text())
    assert saved["performance"]["model"]["auroc"] == pytest.approx(
        float(card_files.comparison.set_index("model").loc["model", "auroc"])
    )
