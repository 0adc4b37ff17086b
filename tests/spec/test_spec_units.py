import pytest

from uniframe.spec.units import format_size, parse_count_or_percent, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("256Mi", 256 * 1024**2),
        ("1Gi", 1024**3),
        ("1.5Gi", 1536 * 1024**2),
        ("512M", 512 * 1000**2),
        ("64k", 64_000),
        ("4Ki", 4096),
        ("1024", 1024),
        (" 2Ti ", 2 * 1024**4),
        (4096, 4096),
    ],
)
def test_sizes(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("256Mb", "'256Mb' is not a size, use e.g. 256Mi"),
        ("256 MiB", "'256 MiB' is not a size, use e.g. 256Mi"),
        ("lots", "'lots' is not a size, use e.g. 256Mi"),
        ("", "'' is not a size, use e.g. 256Mi"),
        ("0Mi", "'0Mi' must be more than 0 bytes, use e.g. 256Mi"),
        ("0.5", "'0.5' is not a whole number of bytes, use e.g. 256Mi"),
        (True, "True is not a size, use e.g. 256Mi"),
        (1.5, "1.5 is not a size, use e.g. 256Mi"),
        (-1, "-1 must be more than 0 bytes, use e.g. 256Mi"),
    ],
)
def test_not_sizes(text: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert str(info.value) == message


def test_format_size_is_the_inverse_for_binary_units() -> None:
    for text in ("256Mi", "1Gi", "3Ki", "2Ti", "1000"):
        assert format_size(parse_size(text)) == text


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (3, 3), ("25%", "25%"), ("100%", "100%"), ("007%", "7%")])
def test_count_or_percent(value: object, expected: object) -> None:
    assert parse_count_or_percent(value) == expected


@pytest.mark.parametrize("value", [-1, "101%", "25", "a%", 1.5, True, None])
def test_not_count_or_percent(value: object) -> None:
    with pytest.raises(ValueError):
        parse_count_or_percent(value)
