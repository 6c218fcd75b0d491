"""Numbers as reports print them, never rounded into a perfection they do not have: an AUROC of 0.99987 at three
decimals would read 1.000 (every pair ranked right) though one image outranks five; it is printed 0.9999."""
from __future__ import annotations

MAX_DECIMALS = 6


def decimals(value: float, digits: int, scale: float = 1.0) -> str:
    """`value * scale` with `digits` decimals, or more where rounding would reach 0 or `scale` (0.0%, 100.0%, 1.000)
    that the value itself is not."""
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
