"""Open a `lowbit compare` report in headless Chromium, check that it renders, save a screenshot.

    python benchmarks/screenshot_html.py benchmarks/results/compare-smollm2/report.html \
        benchmarks/results/compare-smollm2/report.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lowbit.compare.browser import BrowserUnavailable, render


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("png", type=Path)
    args = parser.parse_args()
    try:
        check = render(args.html, args.png)
    except BrowserUnavailable as err:
        print(f"skipped: {err}")
        return 0
    print(f"rendered {check.rows} table rows, plot {check.image_width} px wide; after sorting by perplexity: "
          f"{', '.join(check.first_column_after_sort)}")
    if check.rows == 0 or check.image_width == 0:
        print("the report did not render its table or its plot")
        return 1
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
