"""Resource quantities: cpu cores, bytes of memory, the short form shown to people, and
durations."""

from __future__ import annotations

import math

import pytest

from corral.schemas.quantities import format_bytes, parse_bytes, parse_cpu, parse_duration


@pytest.mark.parametrize(
    ("value", "cores"),
    [
        ("500m", 0.5),
        ("250m", 0.25),
        ("1m", 0.001),
        ("2", 2.0),
        ("0.5", 0.5),
        (" 1.5 ", 1.5),
        ("100 m", 0.1),
        (0.5, 0.5),
        (2, 2.0),
        (0, 0.0),
    ],
)
def test_parse_cpu_reads_cores_and_millicores(value: str | float, cores: float) -> None:
    result = parse_cpu(value)
    assert isinstance(result, float)
    assert result == pytest.approx(cores)


@pytest.mark.parametrize("value", ["", "m", "abc", "1.5.5", "500M", "1Gi", "1e3", "-1", "0.5 cpu"])
def test_parse_cpu_rejects_unreadable_text(value: str) -> None:
    with pytest.raises(ValueError, match="cpu"):
        parse_cpu(value)


def test_parse_cpu_error_suggests_a_form() -> None:
    with pytest.raises(ValueError, match=r"500m"):
        parse_cpu("half")


def test_parse_cpu_rejects_negative_numbers() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_cpu(-0.5)


@pytest.mark.parametrize("value", [True, False])
def test_parse_cpu_rejects_booleans(value: bool) -> None:
    with pytest.raises(ValueError, match="cpu"):
        parse_cpu(value)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_parse_cpu_rejects_non_finite_numbers(value: float) -> None:
    with pytest.raises(ValueError, match="cpu"):
        parse_cpu(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("64Mi", 64 * 2**20),
        ("1Ki", 1024),
        ("1Gi", 2**30),
        ("2Ti", 2 * 2**40),
        ("1.5Mi", 3 * 2**19),
        ("1k", 1000),
        ("1K", 1000),
        ("512M", 512 * 10**6),
        ("1G", 10**9),
        ("1T", 10**12),
        ("123", 123),
        (" 64 Mi ", 64 * 2**20),
        (67108864, 67108864),
        (1.9, 1),
        ("0", 0),
    ],
)
def test_parse_bytes_reads_binary_and_decimal_units(value: str | float, size: int) -> None:
    result = parse_bytes(value)
    assert isinstance(result, int)
    assert result == size


@pytest.mark.parametrize("value", ["1m", "1MB", "1mi", "1Kib", "1b", "1P"])
def test_parse_bytes_rejects_unknown_units_and_names_them(value: str) -> None:
    with pytest.raises(ValueError, match="unknown memory unit"):
        parse_bytes(value)


@pytest.mark.parametrize("value", ["", "Mi", "-1Mi", "1.2.3Mi", "1e6", "lots"])
def test_parse_bytes_rejects_unreadable_text(value: str) -> None:
    with pytest.raises(ValueError, match="cannot read memory quantity"):
        parse_bytes(value)


def test_parse_bytes_rejects_negative_numbers() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_bytes(-1)


def test_parse_bytes_rejects_booleans() -> None:
    with pytest.raises(ValueError, match="memory"):
        parse_bytes(True)


def test_parse_bytes_rejects_infinity_with_value_error() -> None:
    with pytest.raises(ValueError, match="memory"):
        parse_bytes(math.inf)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0"),
        (1023, "1023"),
        (1024, "1Ki"),
        (64 * 2**20, "64Mi"),
        (2**30, "1Gi"),
        (3 * 2**40, "3Ti"),
        (2**50, "1024Ti"),
        (1536, "1.5Ki"),
        (3 * 2**29, "1536Mi"),
        (3 * 2**29 + 1, "1.5Gi"),
        (2**20 + 1, "1.0Mi"),
    ],
)
def test_format_bytes_picks_the_largest_exact_or_rounded_unit(size: int, text: str) -> None:
    assert format_bytes(size) == text


@pytest.mark.parametrize("size", [0, 5, 1024, 3 * 2**20, 7 * 2**30, 2**40, 1536, 2**20 * 5 // 2])
def test_format_then_parse_round_trips_exact_sizes(size: int) -> None:
    assert parse_bytes(format_bytes(size)) == size


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (5, 5.0),
        (2.5, 2.5),
        ("0", 0.0),
        ("2.5", 2.5),
        ("10", 10.0),
        ("500ms", 0.5),
        ("1ms", 0.001),
        ("0s", 0.0),
        ("5s", 5.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1h30m", 5400.0),
        ("1h0m1s500ms", 3601.5),
        (" 5s ", 5.0),
    ],
)
def test_parse_duration_reads_seconds_and_units(value: str | float, seconds: float) -> None:
    result = parse_duration(value)
    assert isinstance(result, float)
    assert result == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        "",
        " ",
        "s",
        "ms",
        "5x",
        "5d",
        "5 s",
        "5S",
        "5sec",
        "1e3",
        "-5s",
        "-5",
        "5s-",
        "1m 30s",
        "soon",
    ],
)
def test_parse_duration_rejects_unreadable_text(value: str) -> None:
    with pytest.raises(ValueError, match="cannot read duration"):
        parse_duration(value)


def test_parse_duration_error_suggests_forms() -> None:
    with pytest.raises(ValueError, match=r"500ms, 5s, 5m, 1h"):
        parse_duration("a while")


@pytest.mark.parametrize("value", [-1, -0.5])
def test_parse_duration_rejects_negative_numbers(value: float) -> None:
    with pytest.raises(ValueError, match="non-negative"):
        parse_duration(value)


@pytest.mark.parametrize("value", [True, False])
def test_parse_duration_rejects_booleans(value: bool) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_parse_duration_rejects_non_finite_numbers(value: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        parse_duration(value)
