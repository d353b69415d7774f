"""Parse the human units operators type: durations (`90s`, `1h`, `7d`) and sizes (`200M`)."""

from __future__ import annotations

import re

_DURATION = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_duration(text: str) -> float:
    """Seconds in `text`: a number with an optional unit s/m/h/d/w, or several (`1h30m`)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", text.strip().lower())
    joined = "".join(f"{n}{u}" for n, u in parts)
    if not parts or joined != re.sub(r"\s+", "", text.strip().lower()):
        raise ValueError(f"not a duration: {text!r} (try 90s, 30m, 1h, 7d)")
    return sum(float(n) * _DURATION[u] for n, u in parts)


def parse_size(text: str) -> int:
    """Bytes in `text`: a number with an optional K/M/G/T suffix (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise ValueError(f"not a size: {text!r} (try 200M, 1G)")
    return int(float(m.group(1)) * _SIZE[m.group(2)])
