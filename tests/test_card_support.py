"""Shared by the model-card tests (the risk card in test_card.py, the benefit card in test_benefit.py).

Why a helper module: both cards are checked the same way (issue 7): rendered by a real headless Chromium,
and every section's numbers read back *from the page* and compared with the run that produced them. A
substring search for a number would pass when the number sits in the wrong row or table, so the page's
tables are parsed (stdlib ``html.parser``) and compared cell by cell.
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from masml import card

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def install_chromium() -> str:
    """Make headless Chromium available: '' when it is, else why it cannot be.

    Chromium comes from Debian's ``chromium`` package; when it is missing it is installed with apt-get
    (CI runs as root on a clean machine)."""
    if card.chromium():
        return ""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return "Chromium is missing and cannot be installed here (needs apt-get as root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True, timeout=600)
    done = subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True,
                          text=True, timeout=1200)  # fmt: skip
    if done.returncode != 0 or not card.chromium():
        return f"apt-get install chromium failed: {done.stderr[-2000:]}"
    return ""


def ensure_chromium() -> None:
    """Fail the test (never skip it) when no Chromium can be had: the card must be tested in a browser."""
    reason = install_chromium()
    if reason:
        pytest.fail(reason)


def dump_dom(page: Path) -> str:
    """The DOM as Chromium built it from the page (entities of ``&`` decoded for plain comparisons)."""
    done = subprocess.run([card.chromium(), *card.CHROMIUM_FLAGS, "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.replace("&amp;", "&")


def screenshot(page: Path, name: str, size: tuple[int, int] = (1200, 2400)) -> np.ndarray:
    """Chromium's screenshot of the page, kept in test-artifacts/NAME for a human; grey levels 0-255."""
    from PIL import Image

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / name
    shot.unlink(missing_ok=True)
    card.run_chromium([f"--window-size={size[0]},{size[1]}", "--hide-scrollbars", f"--screenshot={shot}",
                       page.resolve().as_uri()])  # fmt: skip
    return np.asarray(Image.open(shot).convert("L"), dtype=float)


def assert_not_blank(pixels: np.ndarray) -> None:
    """Text and figures on the page: contrast, and a share of dark pixels an empty or error page lacks."""
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.01


def figures(dom: str) -> dict[str, tuple[int, int]]:
    """Each embedded figure's caption (its alt text) → the pixel size of the PNG it decodes to."""
    from PIL import Image

    out = {}
    for alt, data in re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', dom):
        with Image.open(io.BytesIO(base64.b64decode(data))) as img:
            img.verify()  # a truncated or corrupt PNG raises here
        with Image.open(io.BytesIO(base64.b64decode(data))) as img:
            out[alt] = img.size
    return out


class _Tables(HTMLParser):
    """Every <table> of the page as rows of cell texts, grouped by the id of its <section>; a table with
    a <thead> is a data table (first row = column titles), one without is a list of (label, value)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_section: dict[str, list[dict]] = {}
        self.section = ""
        self.row: list[str] | None = None
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "section":
            self.section = dict(attrs).get("id", "")
        elif tag == "table":
            self.by_section.setdefault(self.section, []).append({"headed": False, "rows": []})
        elif tag == "thead":
            self.by_section[self.section][-1]["headed"] = True
        elif tag == "tr":
            self.row = []
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.row is not None and self.cell is not None:
            # the card keeps an interval on one line with a no-break space: compare it as a space
            self.row.append("".join(self.cell).replace("\xa0", " ").strip())
            self.cell = None
        elif tag == "tr" and self.row is not None:
            self.by_section[self.section][-1]["rows"].append(self.row)
            self.row = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def _tables(page: str, section: str) -> list[dict]:
    parser = _Tables()
    parser.feed(page)
    found = parser.by_section.get(section)
    assert found, f"no tables in section {section!r}"
    return found


def table(page: str, section: str, header: str) -> list[dict[str, str]]:
    """The rows (header → cell text) of the one data table in ``section`` with a column titled
    ``header``; more or fewer than one such table fails the test."""
    matches = [t["rows"] for t in _tables(page, section) if t["headed"] and header in t["rows"][0]]
    assert len(matches) == 1, f"{len(matches)} tables in {section!r} have a column {header!r}"
    head, *rows = matches[0]
    return [dict(zip(head, r, strict=True)) for r in rows]


def by(rows: list[dict[str, str]], key: str) -> dict[str, dict[str, str]]:
    """Rows keyed by one column (e.g. the model name); a duplicate key fails the test."""
    keyed = {r[key]: r for r in rows}
    assert len(keyed) == len(rows), f"duplicate {key!r} in {[r[key] for r in rows]}"
    return keyed


def pairs(page: str, section: str) -> dict[str, str]:
    """The (label, value) tables of a section, merged into one mapping."""
    out: dict[str, str] = {}
    for t in _tables(page, section):
        if not t["headed"] and all(len(r) == 2 for r in t["rows"]):
            for label, value in t["rows"]:
                assert label not in out, f"{label!r} twice in section {section!r}"
                out[label] = value
    return out


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def interval(est, lo, hi) -> str:
    """How the card must print an estimate with its 95% CI: "est [lo, hi]", or "–" when undefined."""
    if _missing(est):
        return "–"
    if _missing(lo):
        return card.fmt(float(est))
    return f"{card.fmt(float(est))} [{card.fmt(float(lo))}, {card.fmt(float(hi))}]"
