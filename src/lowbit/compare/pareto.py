"""The Pareto front of a quality-versus-size trade-off: the cells no other cell beats on both."""

from __future__ import annotations

import math
from collections.abc import Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when both coordinates are to be minimised.

    A point is dominated when another is no worse in both coordinates and better in at least one;
    equal points do not dominate each other, so all copies of a front point are kept. Points with
    a NaN or infinite coordinate (a cell whose perplexity overflowed) are never on the front.
    Sorted by (x, y), every earlier point has x' <= x, so a point is on the front exactly when its
    y is below that of every earlier distinct point: one sweep, in increasing x order.
    """
    finite = [i for i, (x, y) in enumerate(points) if math.isfinite(x) and math.isfinite(y)]
    order = sorted(finite, key=lambda i: (points[i][0], points[i][1]))
    front: list[int] = []
    best_y = math.inf
    start = 0
    while start < len(order):
        value = tuple(points[order[start]])
        end = start
        while end < len(order) and tuple(points[order[end]]) == value:
            end += 1
        if value[1] < best_y:
            front.extend(order[start:end])
        best_y = min(best_y, value[1])
        start = end
    return front
