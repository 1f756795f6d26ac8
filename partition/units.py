"""Human units: parse sizes, bandwidths and durations; format them back.

SI prefixes (``k``, ``M``, ``G``, ``T``) are powers of 1000; binary ones (``Ki``, ``Mi``,
``Gi``, ``Ti``) powers of 1024. Every parser raises :class:`ValueError` with one sentence that
names the bad value and shows valid examples; the cluster loader adds the field's path.
"""

from __future__ import annotations

import math
import re

_NUMBER = r"(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)"
_QUANTITY = re.compile(rf"^\s*{_NUMBER}\s*(?P<unit>[^\s\d.+-].*?)?\s*$")

_PREFIXES: dict[str, int] = {
    "": 1,
    "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
    "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4,
}
_SIZE_UNIT = re.compile(r"^(?P<prefix>[kmgt]i?)?b(?:ytes?)?$", re.IGNORECASE)
_RATE_UNIT = re.compile(
    r"^(?P<prefix>[kmgtKMGT]i?)?(?:(?P<bits>bps|bits?/s|b/s)|(?P<bytes>Bps|B/s|bytes?/s))$"
)
_SECONDS: dict[str, float] = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}

SIZE_EXAMPLES = "512MiB, 2GiB, 4GB"
BANDWIDTH_EXAMPLES = "100Mbps, 1Gbps, 12.5MB/s"
DURATION_EXAMPLES = "2ms, 1.5s, 300us"


def _split(value: object, error: ValueError) -> tuple[float, str]:
    """``(number, unit)`` of a quantity such as ``"2 GiB"``; raise ``error`` if it is none."""
    match = _QUANTITY.match(value) if isinstance(value, str) else None
    if match is None:
        raise error
    return float(match["number"]), match["unit"] or ""


def parse_size(value: object) -> int:
    """Bytes in a size such as ``2GiB`` or ``1.5 GB``; a plain integer is bytes.

    >>> parse_size("2GiB")
    2147483648
    >>> parse_size("1.5 GB")
    1500000000
    >>> parse_size(4096)
    4096

    Raises
    ------
    ValueError
        The value is not a number with a size unit.
    """
    error = ValueError(f"{value!r} is not a size (examples: {SIZE_EXAMPLES})")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number, unit = _split(value, error)
    if unit == "":
        if not re.fullmatch(r"\s*[+-]?\d+\s*", value):
            raise error
        return int(value)
    match = _SIZE_UNIT.match(unit)
    if match is None:
        raise error
    return round(number * _PREFIXES[(match["prefix"] or "").lower()])


def parse_bandwidth(value: object) -> float:
    """Bytes per second in a rate such as ``100Mbps``, ``8 Mbit/s`` or ``12.5MB/s``.

    ``bps``, ``bit/s`` and ``b/s`` count bits; ``B/s``, ``Bps`` and ``byte/s`` count bytes.

    >>> parse_bandwidth("100Mbps")
    12500000.0
    >>> parse_bandwidth("12.5MB/s")
    12500000.0
    >>> parse_bandwidth("1 GiB/s")
    1073741824.0

    Raises
    ------
    ValueError
        The value is not a number with a rate unit (a bare number is ambiguous).
    """
    error = ValueError(f"{value!r} is not a bandwidth (examples: {BANDWIDTH_EXAMPLES})")
    number, unit = _split(value, error)
    match = _RATE_UNIT.match(unit)
    if match is None:
        raise error
    scale = _PREFIXES[(match["prefix"] or "").lower()]
    return number * scale / 8 if match["bits"] else number * scale


def parse_duration(value: object) -> float:
    """Seconds in a duration such as ``2ms``, ``1.5s`` or ``300us``; ``0`` needs no unit.

    >>> parse_duration("2ms")
    0.002
    >>> parse_duration("300us")
    0.0003
    >>> parse_duration(0)
    0.0

    Raises
    ------
    ValueError
        The value is not a number with a time unit.
    """
    error = ValueError(f"{value!r} is not a duration (examples: {DURATION_EXAMPLES})")
    if isinstance(value, int | float) and not isinstance(value, bool) and value == 0:
        return 0.0
    number, unit = _split(value, error)
    if unit == "" and number == 0:
        return 0.0
    if unit not in _SECONDS:
        raise error
    return number * _SECONDS[unit]


def format_bytes(nbytes: float) -> str:
    """A byte count with a binary prefix, for tables.

    >>> format_bytes(512)
    '512 B'
    >>> format_bytes(1536)
    '1.5 KiB'
    >>> format_bytes(2 * 1024**3)
    '2.0 GiB'
    """
    if not math.isfinite(nbytes):
        return str(nbytes)
    if abs(nbytes) < 1024:
        return f"{nbytes:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        nbytes /= 1024
        if abs(nbytes) < 1024:
            return f"{nbytes:.1f} {unit}"
    return f"{nbytes / 1024:.1f} TiB"


def format_bandwidth(bytes_per_s: float) -> str:
    """A bandwidth in bits per second, as ``nodes.yaml`` takes it (four significant digits).

    >>> format_bandwidth(12_500_000)
    '100Mbps'
    >>> format_bandwidth(2_436_000)
    '19.49Mbps'
    >>> format_bandwidth(1234.5)
    '9.876kbps'
    >>> parse_bandwidth(format_bandwidth(2_436_000))
    2436250.0
    """
    return _scaled(bytes_per_s * 8, (("Tbps", 1e12), ("Gbps", 1e9), ("Mbps", 1e6),
                                     ("kbps", 1e3), ("bps", 1.0)))


def format_duration(seconds: float) -> str:
    """A duration, as ``nodes.yaml`` takes it (four significant digits).

    >>> format_duration(0.0021234)
    '2.123ms'
    >>> format_duration(0.000185)
    '185us'
    >>> format_duration(0)
    '0s'
    """
    return _scaled(seconds, (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)))


def _scaled(value: float, units: tuple[tuple[str, float], ...]) -> str:
    """``value`` in the largest of ``units`` (largest first) that leaves it at least 1."""
    if value == 0:
        return f"0{units[0][0]}"
    name, scale = next(((n, s) for n, s in units if abs(value) >= s), units[-1])
    return f"{value / scale:.4g}{name}"
