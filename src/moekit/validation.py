"""Checks shared by the config dataclasses: errors name the field, the value and what is allowed."""

from __future__ import annotations

import math
from typing import Any


def invalid(owner: str, field_name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{owner}.{field_name}={value!r} is invalid: {allowed}")


def is_int(v: Any) -> bool:
    """An int that is not a bool (True would otherwise pass as 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def reject_unknown_fields(cls: type, d: dict[str, Any]) -> None:
    """from_dict's guard: a misspelt key is an error listing the valid ones, not a default."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; valid: {sorted(names)}")
