"""Numbers as reports print them, never rounded into a perfection they do not have: an AUROC of 0.99987 at three
decimals would read 1.000 (every pair ranked right) though one image outranks five; it is printed 0.9999."""
from __future__ import annotations

MAX_DECIMALS = 12
# Ratios of sums computed in float64 (an image's share of 1 − AUROC) land this close to 0 or 1 when they are
# exactly that; a real AUROC this close to 1 would need about 10^12 (positive, negative) pairs.
FLOAT_NOISE = 1e-12


def decimals(value: float, digits: int, scale: float = 1.0) -> str:
    """`value * scale` with `digits` decimals, or more where rounding would reach 0 or `scale` (0.0%, 100.0%, 1.000)
    that the value itself is not."""
    if min(abs(value), abs(value - 1.0)) <= FLOAT_NOISE:
        value = float(round(value))
    scaled = scale * value
    for places in range(digits, MAX_DECIMALS + 1):
        text = f"{scaled:.{places}f}"
        if value in (0.0, 1.0) or float(text) not in (0.0, scale):
            return text
    return text


def percent(value: float | None) -> str:
    return "–" if value is None else f"{decimals(value, 1, 100.0)}%"


def number(value: float | None) -> str:
    return "–" if value is None else decimals(value, 3)
