"""The sample report renders in headless Chromium (skipped where no Chromium is installed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from screenshot_report import find_chromium  # noqa: E402


@pytest.mark.slow
@pytest.mark.skipif(find_chromium() is None, reason="no Chromium on PATH (apt-get install chromium)")
def test_sample_report_screenshot(tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot_report.py"), "-o", str(shot),
                           "--report-dir", str(tmp_path / "report"), "--window-size", "900,1400"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (900, 1400)
    # not a blank page: the title, table of contents and the first figures put many colours on it
    assert len(img.getcolors(maxcolors=1 << 20)) > 200
    assert (tmp_path / "report" / "index.html").is_file()
