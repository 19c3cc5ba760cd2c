"""The field checks every section's validation is made of: a value among the allowed names, a positive number, a
fraction in a range. Each failure is a `UserError` naming the field, with the fix."""

from __future__ import annotations

import math
from typing import Any

from seqpar.errors import UserError


def choice(field_name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(field_name, f"is {value!r}, not one of {', '.join(allowed)}", f"set {field_name}=<one of those>")


def positive(field_name: str, value: int | float, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok) or (isinstance(value, float) and not math.isfinite(value)):
        bound = ">= 0" if zero_ok else "> 0"
        raise UserError(field_name, f"is {value}, must be {bound}", f"set {field_name} to a value {bound}")


def fraction(field_name: str, value: float, lo_open: bool = False, hi: float = 1.0) -> None:
    ok = (0.0 < value if lo_open else 0.0 <= value) and value < hi
    if not ok:
        lo = "(0" if lo_open else "[0"
        raise UserError(field_name, f"is {value}, must be in {lo}, {hi})", f"set {field_name} inside that range")
