"""Byte sizes in the policy: ``min_free`` (``"15%"`` of the filesystem or a size like ``"500G"``)
and the short human form used in reasons (``"120G"``). Pure; no I/O.

Sizes use binary units, as ``df -h`` and ``du -h`` print them: ``K`` = 1024 bytes, ``G`` = 1024**3.
``"500G"``, ``"500GB"``, ``"500GiB"`` and ``"500g"`` are the same size; a bare number is bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["MinFree", "format_percent", "format_size", "parse_min_free"]

_UNITS = "KMGTPE"
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(?:([KMGTPE])(?:i?B)?|B)?", re.IGNORECASE)
_PERCENT_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*%")
_EXPECTED = "expected a share of the filesystem like '15%' or a size like '500G'"


@dataclass(frozen=True, slots=True)
class MinFree:
    """A parsed ``min_free``: ``percent`` of the filesystem's size, or an absolute ``size``."""

    percent: float | None = None
    size: int | None = None

    def bytes_for(self, total_bytes: int) -> int:
        """The free space wanted on a filesystem of ``total_bytes``."""
        if self.percent is not None:
            return math.ceil(total_bytes * self.percent / 100)
        assert self.size is not None
        return self.size

    def describe(self, free_bytes: int, total_bytes: int) -> str:
        """``"8% free < 15%"`` or ``"120G free < 500G"``, in the threshold's own terms."""
        if self.percent is not None:
            share = 100.0 * free_bytes / total_bytes if total_bytes > 0 else 0.0
            return f"{format_percent(share)} free < {format_percent(self.percent)}"
        assert self.size is not None
        return f"{format_size(free_bytes)} free < {format_size(self.size)}"


def parse_min_free(value: object) -> MinFree:
    """``"15%"``, ``"12.5%"``, ``"500G"``, ``"1.5TiB"``, ``"1048576"`` or an integer of bytes.

    Raises ValueError with the reason (the caller names the key)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{_EXPECTED}, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"a size must be > 0 bytes, got {value!r}")
        return MinFree(size=value)
    text = value.strip()
    if m := _PERCENT_RE.fullmatch(text):
        percent = float(m[1])
        if not 0 < percent < 100:
            raise ValueError(f"a share must be between 0% and 100% (exclusive), got {value!r}")
        return MinFree(percent=percent)
    if m := _SIZE_RE.fullmatch(text):
        scale = 1024 ** (_UNITS.index(m[2].upper()) + 1) if m[2] else 1
        size = math.ceil(float(m[1]) * scale)
        if size <= 0:
            raise ValueError(f"a size must be > 0 bytes, got {value!r}")
        return MinFree(size=size)
    raise ValueError(f"{_EXPECTED}, got {value!r}")


def format_size(n: int | float) -> str:
    """``1536`` -> ``"1.5K"``, ``5 * 1024**3`` -> ``"5G"``; one decimal below 10 units."""
    value, unit = float(n), ""
    for u in _UNITS:
        if abs(value) < 1024:
            break
        value, unit = value / 1024, u
    if not unit:
        return f"{int(value)}B"
    text = f"{value:.1f}" if abs(value) < 10 else f"{value:.0f}"
    return (text[:-2] if text.endswith(".0") else text) + unit


def format_percent(share: float) -> str:
    """``8.0`` -> ``"8%"``, ``14.64`` -> ``"14.6%"`` (never rounded up to the threshold's look)."""
    text = f"{math.floor(share * 10) / 10:.1f}"
    return (text[:-2] if text.endswith(".0") else text) + "%"
