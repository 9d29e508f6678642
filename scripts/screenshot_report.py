"""Render the sample report (synthetic data) in headless Chromium and save a PNG screenshot.

    PYTHONPATH=$PWD python scripts/screenshot_report.py -o /tmp/report.png [--report-dir DIR]

Builds ``lora_lens.report.sample.sample_report()`` with ``write_report``,
then runs Chromium offline (no network, no GPU, a throw-away profile) on
``file://…/index.html``. Needs a Chromium binary (Debian: ``apt-get install
chromium``); exits 2 with a one-line message when none is found.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def chromium_command(browser: str, html: Path, png: Path, profile: Path, window: str) -> list[str]:
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
            f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={window}", html.resolve().as_uri()]


def screenshot(html: Path, png: Path, window: str = "1280,2000", browser: str | None = None,
               timeout: float = 120) -> Path:
    """Screenshot ``html`` into ``png`` with headless Chromium; returns ``png``."""
    browser = browser or find_chromium()
    if browser is None:
        raise FileNotFoundError(f"no Chromium found (tried {', '.join(BROWSERS)}); install it: apt-get install chromium")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lora-lens-chromium-") as profile:
        cmd = chromium_command(browser, html, png.resolve(), Path(profile), window)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not png.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"chromium exited {proc.returncode} without a screenshot: {' | '.join(tail)}")
    return png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, default=Path("report-screenshot.png"), help="screenshot PNG to write")
    ap.add_argument("--report-dir", type=Path, default=None,
                    help="where to write the sample report (default: a temporary folder, removed afterwards)")
    ap.add_argument("--window-size", default="1280,2000", help="WIDTH,HEIGHT in CSS pixels (default 1280,2000)")
    ap.add_argument("--chromium", default=None, help="browser binary (default: the first of %s on PATH)" % (BROWSERS,))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from lora_lens.report import write_report
    from lora_lens.report.sample import sample_data, sample_report

    with tempfile.TemporaryDirectory(prefix="lora-lens-report-") as tmp:
        report_dir = args.report_dir or Path(tmp) / "report"
        data = sample_data(args.seed)
        index = write_report(report_dir, sample_report(args.seed, data), json_data=data, overwrite=True)
        try:
            png = screenshot(index, args.out, window=args.window_size, browser=args.chromium)
        except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"screenshot_report: {e}", file=sys.stderr)
            return 2
    print(f"report: {index if args.report_dir else '(temporary)'}\nscreenshot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
