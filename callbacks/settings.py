"""Range checks of callback arguments: one line naming the argument, the value and the allowed range."""

from __future__ import annotations

import math

RANGE_ERROR = "is out of range"


def check_range(owner: str, name: str, value, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, allow_none: bool = False) -> None:
    """Raise ``ValueError("<owner>.<name>=<value> is out of range: allowed <interval>")`` unless
    ``value`` is a number in the interval (``None`` only with ``allow_none``)."""
    if value is None and allow_none:
        return
    inside = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if inside and low is not None:
        inside = value > low if low_open else value >= low
    if inside and high is not None:
        inside = value < high if high_open else value <= high
    if not inside:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{left}, {right}{')' if high_open or high is None else ']'}"
        extra = " or null" if allow_none else ""
        raise ValueError(f"{owner}.{name}={value!r} {RANGE_ERROR}: allowed {interval}{extra}")
