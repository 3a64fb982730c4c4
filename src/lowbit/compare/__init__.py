"""`lowbit compare`: quantize one model many ways and show the trade-off between size and quality.

grid (cells from recipe axes and peers) -> runner (quantize, evaluate, cache per cell) -> pareto ->
report (results.json, results.csv, pareto.png, report.html); peers/ holds the other tools, lmeval
the lm-eval-harness bridge, command the CLI's arguments and table. Modules are imported where used,
so `lowbit --help` does not pay for them.
"""
