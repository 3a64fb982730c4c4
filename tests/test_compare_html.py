"""The HTML report opened in headless Chromium: table rendered, plot decoded, header click sorts."""

from __future__ import annotations

import pytest

from lowbit.compare.browser import BrowserUnavailable, render
from lowbit.compare.html import write_html

ORIGINAL = {"label": "original", "tool": "original", "method": "original", "bits_per_weight": 16.0,
            "model_megabytes": 270.0, "perplexity": 17.0, "kl": 0.0, "quantize_seconds": 0.0, "status": "ok"}


def row(label: str, bpw: float, perplexity: float, **extra) -> dict:
    return {"label": label, "tool": "lowbit", "method": label.split()[0], "bits_per_weight": bpw,
            "model_megabytes": bpw * 10, "perplexity": perplexity, "kl": perplexity / 100,
            "quantize_seconds": 1.0, "status": "ok", **extra}


def test_report_renders_and_sorts_in_chromium(tmp_path):
    pytest.importorskip("matplotlib")
    from lowbit.compare.plot import plot_pareto

    rows = [row("rtn w2", 2.5, 900.0), row("gptq w4", 4.3, 20.0, pareto_perplexity=True),
            row("gptq w3", 3.3, 36.0, pareto_perplexity=True),
            {"label": "hqq w4", "tool": "hqq", "method": "hqq", "status": "skipped", "note": "not installed"}]
    png, html = tmp_path / "pareto.png", tmp_path / "report.html"
    plot_pareto(rows, ORIGINAL, png, "test")
    write_html({"model": "tiny", "notes": ["peer x skipped: not installed"]}, ORIGINAL, rows, png, html, "test")
    try:
        check = render(html, tmp_path / "screenshot.png")
    except BrowserUnavailable as err:
        pytest.skip(str(err))
    assert check.rows == 5 and check.image_width > 500
    # ascending by perplexity; the skipped cell (no value) sorts last
    assert check.first_column_after_sort == ["original", "gptq w4", "gptq w3", "rtn w2", "hqq w4"]
    assert (tmp_path / "screenshot.png").read_bytes()[:4] == b"\x89PNG"
