"""Units of the stack file: parsing, formatting round trips, ordering, refusal of garbage."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from decimal import Decimal

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from shipyard.spec.units import (
    format_cpu,
    format_duration,
    format_size,
    parse_cpu,
    parse_duration,
    parse_size,
)

# per test, not a profile: loading a profile would change every other module's settings
SETTINGS = settings(deadline=None, max_examples=100)

PARSERS = [parse_cpu, parse_size, parse_duration]


@pytest.mark.parametrize(
    ("text", "cores"),
    [("500m", 0.5), ("0.5", 0.5), ("2", 2.0), (2, 2.0), (0.25, 0.25), ("1500m", 1.5), (" 1 ", 1.0)],
)
def test_cpu_examples(text: object, cores: float) -> None:
    assert parse_cpu(text) == pytest.approx(cores)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("256Mi", 256 * 2**20),
        ("1Gi", 2**30),
        ("512M", 512 * 10**6),
        ("1024", 1024),
        (1024, 1024),
        ("1.5Ki", 1536),
        ("2GiB", 2 * 2**30),
        ("3kb", 3000),
        ("10b", 10),
    ],
)
def test_size_examples(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("200ms", 0.2),
        ("5s", 5.0),
        ("2m", 120.0),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1.5s", 1.5),
        ("3", 3.0),
        (7, 7.0),
        ("1m 30s", 90.0),
    ],
)
def test_duration_examples(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("parser", "garbage"),
    [
        (parse_duration, "fast"),
        (parse_duration, "-5s"),
        (parse_duration, "5 sec"),
        (parse_duration, "5S"),
        (parse_duration, "s"),
        (parse_duration, ""),
        (parse_duration, "1.2.3s"),
        (parse_duration, "nan"),
        (parse_duration, "inf"),
        (parse_duration, "9" * 400 + "d"),
        (parse_duration, True),
        (parse_duration, float("nan")),
        (parse_duration, [5]),
        (parse_size, "lots"),
        (parse_size, "-1Mi"),
        (parse_size, "1Zi"),
        (parse_size, "9" * 400),
        (parse_size, -1),
        (parse_size, float("inf")),
        (parse_size, False),
        (parse_cpu, "fast"),
        (parse_cpu, "-500m"),
        (parse_cpu, "m"),
        (parse_cpu, "nan"),
        (parse_cpu, "infm"),
        (parse_cpu, None),
        (parse_cpu, True),
    ],
)
def test_garbage_is_refused_with_what_was_expected(
    parser: Callable[[object], float], garbage: object
) -> None:
    with pytest.raises(ValueError, match=r"expected|must"):
        parser(garbage)


def test_messages_show_examples_of_valid_input() -> None:
    with pytest.raises(ValueError, match=r"expected a duration like 200ms, 5s or 2m, got 'fast'"):
        parse_duration("fast")
    with pytest.raises(ValueError, match=r"expected a size like 256Mi"):
        parse_size("big")
    with pytest.raises(ValueError, match=r"expected a CPU amount like 500m"):
        parse_cpu("many")


anything = st.one_of(
    st.text(max_size=30),
    st.text(alphabet="0123456789.msdhkKMGTPib -_e+", max_size=12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
)


@SETTINGS
@given(value=anything)
def test_parsers_return_a_finite_non_negative_number_or_raise_value_error(value: object) -> None:
    for parser in PARSERS:
        try:
            result = parser(value)
        except ValueError:
            continue
        assert isinstance(result, int | float) and not isinstance(result, bool)
        assert math.isfinite(result) and result >= 0


# --- round trips with the format_* helpers -------------------------------------------------

FACTORS = [2**10, 2**20, 2**30, 2**40]


@SETTINGS
@given(count=st.integers(min_value=0, max_value=10**6), factor=st.sampled_from(FACTORS))
def test_size_round_trip_is_exact_on_binary_units(count: int, factor: int) -> None:
    size = count * factor
    assert parse_size(format_size(size)) == size


@SETTINGS
@given(size=st.integers(min_value=0, max_value=1023))
def test_size_round_trip_is_exact_below_one_kibibyte(size: int) -> None:
    assert format_size(size) == str(size)
    assert parse_size(format_size(size)) == size


@SETTINGS
@given(size=st.integers(min_value=0, max_value=2**70))
def test_size_round_trip_is_close_for_any_size(size: int) -> None:
    text = format_size(size)
    assert re.fullmatch(r"\d+(\.\d)?(Ki|Mi|Gi|Ti)?", text), text
    assert parse_size(text) == pytest.approx(size, rel=0.05, abs=1)


@SETTINGS
@given(size=st.integers(min_value=10**400, max_value=10**401))
def test_format_size_handles_sizes_beyond_float_range(size: int) -> None:
    assert format_size(size).endswith("Ti")


@SETTINGS
@given(count=st.integers(min_value=0, max_value=10**5), unit=st.sampled_from(["ms", "s", "m", "h"]))
def test_duration_round_trip_is_exact_on_whole_units(count: int, unit: str) -> None:
    seconds = parse_duration(f"{count}{unit}")
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, rel=1e-9, abs=1e-9)


@SETTINGS
@given(seconds=st.floats(min_value=0, max_value=1e12, allow_nan=False))
def test_duration_round_trip_is_close(seconds: float) -> None:
    text = format_duration(seconds)
    assert "e" not in text, text  # never an exponent the parser would refuse
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-9, abs=1e-3)


@SETTINGS
@given(cores=st.floats(min_value=0, max_value=1e6, allow_nan=False))
def test_cpu_round_trip_is_close(cores: float) -> None:
    assert parse_cpu(format_cpu(cores)) == pytest.approx(cores, rel=1e-9, abs=5.1e-4)


@SETTINGS
@given(millicores=st.integers(min_value=1, max_value=999))
def test_cpu_below_one_core_formats_as_millicores(millicores: int) -> None:
    assert format_cpu(millicores / 1000) == f"{millicores}m"


def test_format_examples() -> None:
    assert format_duration(0.2) == "200ms"
    assert format_duration(5) == "5s"
    assert format_duration(90) == "90s"
    assert format_duration(300) == "5m"
    assert format_duration(7200) == "2h"
    assert format_duration(150) == "2m30s"
    assert format_duration(7325.5) == "2h2m5.5s"
    assert format_size(256 * 2**20) == "256Mi"
    assert format_size(1536) == "1.5Ki"
    assert format_size(100) == "100"
    assert format_cpu(0.5) == "500m"
    assert format_cpu(2) == "2"


# --- ordering ------------------------------------------------------------------------------

numbers = st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False)


@SETTINGS
@given(a=numbers, b=numbers, unit=st.sampled_from(["ms", "s", "m", "h", "d"]))
def test_duration_is_monotonic_in_the_number(a: Decimal, b: Decimal, unit: str) -> None:
    assume(a <= b)
    assert parse_duration(f"{a}{unit}") <= parse_duration(f"{b}{unit}")


@SETTINGS
@given(a=numbers, b=numbers, unit=st.sampled_from(["", "k", "Ki", "M", "Mi", "G", "Gi"]))
def test_size_is_monotonic_in_the_number(a: Decimal, b: Decimal, unit: str) -> None:
    assume(a <= b)
    assert parse_size(f"{a}{unit}") <= parse_size(f"{b}{unit}")


@SETTINGS
@given(a=numbers, b=numbers)
def test_cpu_is_monotonic_and_millicores_are_thousandths(a: Decimal, b: Decimal) -> None:
    assume(a <= b)
    assert parse_cpu(f"{a}m") <= parse_cpu(f"{b}m")
    assert parse_cpu(f"{a}") <= parse_cpu(f"{b}")
    assert parse_cpu(f"{a}m") == pytest.approx(parse_cpu(f"{a}") / 1000)


@SETTINGS
@given(n=st.integers(min_value=1, max_value=10**6))
def test_bigger_units_give_bigger_amounts(n: int) -> None:
    durations = [parse_duration(f"{n}{u}") for u in ("ms", "s", "m", "h", "d")]
    assert durations == sorted(durations) and len(set(durations)) == 5
    sizes = [parse_size(f"{n}{u}") for u in ("", "K", "Ki", "M", "Mi", "G", "Gi", "T", "Ti")]
    assert sizes == sorted(sizes) and len(set(sizes)) == 9


@SETTINGS
@given(
    parts=st.lists(
        st.tuples(st.integers(min_value=0, max_value=1000), st.sampled_from(["ms", "s", "m", "h"])),
        min_size=1,
        max_size=4,
    )
)
def test_compound_durations_add_up(parts: list[tuple[int, str]]) -> None:
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    text = "".join(f"{n}{u}" for n, u in parts)
    assert parse_duration(text) == pytest.approx(sum(n * factor[u] for n, u in parts))
