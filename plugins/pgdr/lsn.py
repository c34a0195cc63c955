"""PostgreSQL log sequence numbers ('16/B374D848') as comparable integers."""

from __future__ import annotations

import re

LSN = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")


def parse_lsn(text: str) -> int:
    if not LSN.fullmatch(text):
        raise ValueError(f"{text!r} is not an LSN (expected like 0/3000060)")
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"
