"""Pareto dominance over K objectives, all maximised: one definition for the algorithms (a
tournament's front) and the reports (the leaderboard's front)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a Pareto-dominates b (maximisation): no worse everywhere, strictly better somewhere."""
    better = False
    for x, y in zip(a, b):
        if x < y:
            return False
        if x > y:
            better = True
    return better


def pareto_mask(points: Sequence[Sequence[float]]) -> list[bool]:
    """True for points no other point dominates; equal points are all kept.

    Sorting descending lexicographically puts every dominator before what it dominates, and a
    point dominated by anyone is dominated by a front member seen earlier, so each point is
    compared with the current front only: O(n * front) instead of O(n^2)."""
    pts = np.asarray(points, dtype=float)
    n = len(pts)
    if n == 0:
        return []
    if pts.ndim == 1:
        pts = pts[:, None]
    order = np.lexsort(tuple(-pts[:, k] for k in reversed(range(pts.shape[1]))))
    mask = np.zeros(n, dtype=bool)
    front: list[np.ndarray] = []
    for i in order:
        p = pts[i]
        if front:
            f = np.asarray(front)
            if np.any(np.all(f >= p, axis=1) & np.any(f > p, axis=1)):
                continue
        mask[i] = True
        front.append(p)
    return mask.tolist()


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points, in order."""
    return [i for i, on_front in enumerate(pareto_mask(points)) if on_front]


def nondominated_ranks(points: Sequence[Sequence[float]]) -> list[int]:
    """Non-dominated sorting: 0 for the Pareto front, 1 for the front of what remains, ..."""
    ranks = [-1] * len(points)
    left = list(range(len(points)))
    rank = 0
    while left:
        mask = pareto_mask([points[i] for i in left])
        for i, on_front in zip(left, mask):
            if on_front:
                ranks[i] = rank
        left = [i for i, on_front in zip(left, mask) if not on_front]
        rank += 1
    return ranks
