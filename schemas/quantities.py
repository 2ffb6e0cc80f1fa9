"""Parsing of resource quantities: `0.5` or `500m` cpus, `64Mi` or `1G` bytes of memory."""

from __future__ import annotations

import math
import re

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_DECIMAL = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_cpu(value: str | float | int) -> float:
    """Cores as a float; `250m` is a quarter of a core."""
    if isinstance(value, bool):
        raise ValueError("cpu must be a number such as 0.5 or 500m")
    if isinstance(value, int | float):
        number = float(value)
    else:
        match = _QUANTITY.match(value)
        if not match or match.group(2) not in ("", "m"):
            raise ValueError(f"cannot read cpu quantity {value!r}; use 0.5 or 500m")
        number = float(match.group(1)) / (1000 if match.group(2) == "m" else 1)
    if not math.isfinite(number) or number < 0:
        raise ValueError("cpu must be a finite, non-negative number")
    return number


def parse_bytes(value: str | float | int) -> int:
    """Bytes as an int; accepts Ki/Mi/Gi/Ti and k/M/G/T suffixes."""
    if isinstance(value, bool):
        raise ValueError("memory must be a number of bytes or a quantity such as 64Mi")
    if isinstance(value, int | float):
        number = float(value)
    else:
        match = _QUANTITY.match(value)
        if not match:
            raise ValueError(f"cannot read memory quantity {value!r}; use 64Mi, 1Gi or 512M")
        unit = match.group(2)
        if unit and unit not in _BINARY and unit not in _DECIMAL:
            raise ValueError(f"unknown memory unit {unit!r}; use Ki, Mi, Gi, Ti, k, M, G or T")
        number = float(match.group(1)) * _BINARY.get(unit, _DECIMAL.get(unit, 1))
    if not math.isfinite(number) or number < 0:
        raise ValueError("memory must be a finite, non-negative number")
    return int(number)


def format_bytes(value: float) -> str:
    for unit in ("Ti", "Gi", "Mi", "Ki"):
        size = _BINARY[unit]
        if value >= size and value % size == 0:
            return f"{int(value // size)}{unit}"
    for unit in ("Gi", "Mi", "Ki"):
        size = _BINARY[unit]
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(int(value))


_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str | float | int) -> float:
    """Seconds as a float; accepts 2.5, "500ms", "5s", "5m", "1h" and "1m30s"."""
    kind = type(value)
    if kind is float or kind is int:  # the common case, first: every template decode runs it
        number = float(value)
        if not math.isfinite(number) or number < 0:
            raise ValueError("a duration must be a finite, non-negative number of seconds")
        return number
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a text such as 5s, 500ms, 5m")
    if isinstance(value, int | float):
        number = float(value)
    else:
        text = value.strip()
        if re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", text):
            number = float(text)
        else:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError(
                    f"cannot read duration {value!r}; use seconds (2.5) or 500ms, 5s, 5m, 1h, 1m30s"
                )
            number = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if not math.isfinite(number) or number < 0:
        raise ValueError("a duration must be a finite, non-negative number of seconds")
    return number
