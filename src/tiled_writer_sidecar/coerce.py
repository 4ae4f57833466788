"""Plain, bounded values from untrusted ones: the one coercion rule of documents and state files.

A document (the tracker) and a state file read back (``spool/state_files.py``) may hold anything: numpy
scalars, a 5,000-digit int, NaN, a str subclass, megabytes of text. Each ``as_*`` returns a plain
Python value within its bound, or None (``as_bool``: False) when the value is not one; none raises.

- An int is an integer (or an integral float, a numpy integer) within `INT64`, or the caller's range;
  a bool is not an int.
- A float is a finite real number (not a bool).
- A text is a str (a subclass becomes a plain str), cut to its field's limit: `MAX_NAME` for a name
  a document gives (plan name, stream name, exit status), `MAX_TEXT` for any other text kept.
- A dict or list keeps at most `MAX_ITEMS` entries; `as_json_value` turns any value into such JSON.
"""

from __future__ import annotations

import itertools
import math
import numbers
import operator
from collections.abc import Mapping
from typing import Any

#: The range of an int kept (what JSON readers and Tiled store without loss).
INT64 = (-(2**63), 2**63 - 1)
#: Longest name from a document kept: plan name, stream name, exit status.
MAX_NAME = 256
#: Longest other text kept (a reason, an error line, a uid field read back).
MAX_TEXT = 1024
#: Most entries kept of one dict or list.
MAX_ITEMS = 1000
_MAX_DEPTH = 16


def as_int(value: object, low: int = INT64[0], high: int = INT64[1]) -> int | None:
    """`value` as a plain int in low..high if it is an integer (or an integral float); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not value.is_integer():  # NaN and infinities too
            return None
        number = int(value)
    else:
        try:
            number = operator.index(value)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - anything that is not an integer (a numpy array, a str)
            return None
    return int(number) if low <= number <= high else None


def as_float(value: object) -> float | None:
    """`value` as a finite plain float if it is a real number (not a bool); else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except Exception:  # noqa: BLE001 - a Real that will not convert
        return None
    return number if math.isfinite(number) else None


def as_text(value: object, limit: int = MAX_TEXT) -> str | None:
    """`value` as a plain str of at most `limit` characters if it is a str; else None."""
    return str.__str__(value)[:limit] if isinstance(value, str) else None


def as_bool(value: object) -> bool:
    """True only for True (or numpy's True); anything else is False."""
    if isinstance(value, bool):
        return value
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_") and bool(value)


def as_counts(value: object, high: int = INT64[1]) -> dict[str, int]:
    """A mapping's first `MAX_ITEMS` entries as names (`MAX_NAME`) to counts in 0..high; entries that
    are not are left out."""
    counts: dict[str, int] = {}
    if isinstance(value, Mapping):
        for key, number in itertools.islice(value.items(), MAX_ITEMS):
            name, count = as_text(key, MAX_NAME), as_int(number, 0, high)
            if name is not None and count is not None:
                counts[name] = count
    return counts


def as_texts(value: object) -> list[str]:
    """The strs (`MAX_TEXT` each) of a list or tuple, at most `MAX_ITEMS`."""
    if not isinstance(value, (list, tuple)):
        return []
    return [text for item in value[:MAX_ITEMS] if (text := as_text(item)) is not None]


def as_floats(value: object) -> list[float]:
    """The finite real numbers (not bools) of a list or tuple, at most `MAX_ITEMS`."""
    if not isinstance(value, (list, tuple)):
        return []
    return [number for item in value[:MAX_ITEMS] if (number := as_float(item)) is not None]


def as_json_value(value: Any, depth: int = 0) -> Any:
    """Any value as plain, bounded JSON (for files whose fields are not typed); None where none fits."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return as_text(value)
    if isinstance(value, dict) and depth < _MAX_DEPTH:
        items = list(value.items())[:MAX_ITEMS]
        return {
            str(k)[:MAX_TEXT] if isinstance(k, (str, int)) else repr(type(k)): as_json_value(v, depth + 1)
            for k, v in items
        }
    if isinstance(value, (list, tuple)) and depth < _MAX_DEPTH:
        return [as_json_value(v, depth + 1) for v in value[:MAX_ITEMS]]
    number = as_int(value)
    if number is not None and not isinstance(value, float):
        return number
    return as_float(value)


__all__ = ["INT64", "MAX_ITEMS", "MAX_NAME", "MAX_TEXT", "as_bool", "as_counts", "as_float", "as_floats"]
__all__ += ["as_int", "as_json_value", "as_text", "as_texts"]
