"""Units of the stack file: CPU (`500m`, `0.5`, `2`), sizes (`256Mi`, `1Gi`, `512M`) and
durations (`200ms`, `5s`, `2m`). Each parser returns a plain number or raises ValueError
with a message fit to show a user."""

from __future__ import annotations

import math
import re

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "p": 10**15,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "pb": 10**15,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
    "pi": 2**50,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# ASCII digits only (the JSON Schema's patterns say the same): float() alone would also
# take `1_000`, `1e3`, `inf` and digits of other scripts
_NUMBER = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
# re.ASCII: \s is the ASCII whitespace the JSON Schema's patterns mean, not U+0085...
_SIZE_RE = re.compile(rf"^\s*{_NUMBER}\s*([a-zA-Z]*)\s*$", re.ASCII)
_CPU_RE = re.compile(rf"^\s*((?:{_NUMBER[1:-1]})(?:[eE][+-]?[0-9]+)?)\s*(m?)\s*$", re.ASCII)
_PLAIN_RE = re.compile(rf"^\s*{_NUMBER}\s*$", re.ASCII)
_DURATION_PART_RE = re.compile(rf"{_NUMBER} *(ms|s|m|h|d) *")  # `1m 30s`, `5 s`


def _finite_non_negative(value: float, what: str, text: object) -> float:
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ValueError(f"{what} must be a finite non-negative number, got {text!r}")
    return value


def parse_cpu(value: object) -> float:
    """CPU in cores: `500m` → 0.5, `0.5` → 0.5, `2` → 2.0."""
    if isinstance(value, bool):
        raise ValueError(f"expected a CPU amount like 500m, 0.5 or 2, got {value!r}")
    if isinstance(value, int | float):
        return _finite_non_negative(float(value), "cpu", value)
    if isinstance(value, str):
        match = _CPU_RE.match(value)
        if match:
            cores = float(match.group(1)) / (1000.0 if match.group(2) else 1.0)
            if not math.isinf(cores):
                return cores
    raise ValueError(f"expected a CPU amount like 500m, 0.5 or 2, got {value!r}")


def parse_size(value: object) -> int:
    """Size in bytes: `256Mi` → 268435456, `512M` → 512000000, `1024` → 1024."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 256Mi, 1Gi or 512M, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value!r}")
        return value
    if isinstance(value, float):
        return int(_finite_non_negative(value, "size", value))
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            unit = match.group(2).lower()
            if unit in _SIZE_UNITS:
                amount = float(match.group(1)) * _SIZE_UNITS[unit]
                if not math.isinf(amount):
                    return int(amount)
    raise ValueError(f"expected a size like 256Mi, 1Gi or 512M, got {value!r}")


def parse_duration(value: object) -> float:
    """Duration in seconds: `200ms` → 0.2, `5s` → 5.0, `2m` → 120.0, `1m30s` → 90.0.

    A bare number is seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 200ms, 5s or 2m, got {value!r}")
    if isinstance(value, int | float):
        return _finite_non_negative(float(value), "duration", value)
    if isinstance(value, str):
        plain = _PLAIN_RE.match(value)
        if plain:
            return _finite_non_negative(float(plain.group(1)), "duration", value)
        text = value.strip(" \t\n\r\f\v")
        pos, total = 0, 0.0
        for match in _DURATION_PART_RE.finditer(text):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            pos = match.end()
        else:
            if pos == len(text) and pos > 0 and not math.isinf(total):
                return total
    raise ValueError(f"expected a duration like 200ms, 5s or 2m, got {value!r}")


def _plain(number: float, decimals: int) -> str:
    """A number without exponent and without trailing zeros: 1.50 → 1.5, 2.0 → 2."""
    return f"{number:.{decimals}f}".rstrip("0").rstrip(".") or "0"


def format_duration(seconds: float) -> str:
    """The short form a user would write: 200ms, 5s, 90s, 2m, 2m30s, 3h. `parse_duration`
    reads it back to within a millisecond."""
    if seconds < 1:
        return f"{_plain(seconds * 1000, 3)}ms"
    if seconds < 120:
        return f"{_plain(seconds, 3)}s"
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000) if seconds >= 7200 else (0, millis)
    minutes, millis = divmod(millis, 60_000)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    return text + (f"{_plain(millis / 1000, 3)}s" if millis else "")


_BINARY = (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10))


def format_size(size: int) -> str:
    """256Mi, 1Gi, 1.5Gi, 512: exact when a binary unit divides the size, else to 0.1."""
    for unit, factor in _BINARY:
        if size >= factor and size % factor == 0 and size // factor < 2**50:
            return f"{size // factor}{unit}"
    for unit, factor in _BINARY:
        if size >= factor:
            tenths = (size * 10 + factor // 2) // factor  # integer maths: no float overflow
            return f"{tenths // 10}.{tenths % 10}{unit}"
    return str(size)


def format_cpu(cores: float) -> str:
    """500m below one core, a plain number from there: 0.5 → 500m, 2 → 2."""
    if cores and cores < 1:
        return f"{_plain(cores * 1000, 3)}m"
    return _plain(cores, 3)
