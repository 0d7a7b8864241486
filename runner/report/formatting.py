"""How the report writes a value: numbers with a sensible number of digits, shares as percentages, sizes in MB, and
anything nested as readable `k: v` text or a sub-table. Nothing here ever returns a Python repr."""

from __future__ import annotations

import math
from typing import Any

from runner.report.render import Block, Cell, Table

DASH = "—"


def num(value: Any, digits: int = 4) -> str:
    """A figure as a person reads it: ints with thousands separators, floats to `digits` significant digits."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value) or value == 0:
            return "0" if value == 0 else str(value)
        if abs(value) >= 10 ** (digits + 3):  # a count that came as a float
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"  # exponent form only below 1e-4
    return str(value)


SHARES = ("accuracy", "f1", "macro_f1", "probe_accuracy", "exact_match", "contains")


def metric(value: Any, name: str = "accuracy") -> str:
    """A score in [0, 1] (accuracy, F1) with four decimals so that a column lines up; a loss or a perplexity as `num`."""
    if name in SHARES and isinstance(value, float) and 0 <= value <= 1:
        return f"{value:.4f}"
    return num(value)


def signed_metric(value: Any) -> str:
    """A difference of two scores, with its sign (− for a drop), four decimals like the scores themselves."""
    if not isinstance(value, (int, float)):
        return DASH
    return f"{'+' if value > 0 else '−' if value < 0 else '±'}{abs(value):.4f}"


def signed_pct(value: Any, digits: int = 1) -> str:
    if not isinstance(value, (int, float)):
        return DASH
    return f"{'+' if value > 0 else '−' if value < 0 else '±'}{100 * abs(value):.{digits}f}%"


def plural(n: Any, word: str, many: str = "") -> str:
    return f"{num(n)} {word if n == 1 else many or word + 's'}"


def pct(value: Any, digits: int = 1) -> str:
    return DASH if not isinstance(value, (int, float)) else f"{100 * value:.{digits}f}%"


def signed(value: Any, digits: int = 4) -> str:
    if not isinstance(value, (int, float)):
        return DASH
    text = num(abs(value), digits)
    return ("+" if value > 0 else "−" if value < 0 else "±") + text


def size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return DASH
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return DASH


def seconds(value: Any) -> str:
    return DASH if not isinstance(value, (int, float)) else f"{value:.1f} s"


def label(key: str) -> str:
    return key.replace("_", " ")


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def text(value: Any, depth: int = 0) -> str:
    """Any JSON value as one line of text: `k: v, k: v` for objects, `a, b, c` for lists (long ones cut)."""
    if _scalar(value):
        return num(value)
    if isinstance(value, dict):
        if not value:
            return "none"
        inner = ", ".join(f"{label(str(k))}: {text(v, depth + 1)}" for k, v in value.items())
        return f"({inner})" if depth else inner
    if isinstance(value, (list, tuple)):
        if not value:
            return "none"
        shown = "; ".join(text(v, depth + 1) for v in value[:8])
        return shown + (f"; … {len(value)} in all" if len(value) > 8 else "")
    return str(value)


def generic(details: dict[str, Any], skip: set[str] | frozenset[str] = frozenset(), title: str = ""
            ) -> tuple[list[list[str | Cell]], list[Block]]:
    """Rows for the fields a section does not format by name, and sub-tables for its lists of records (an unknown
    field added by a stage still shows, readably)."""
    rows: list[list[str | Cell]] = []
    tables: list[Block] = []
    for key, value in details.items():
        if key in skip:
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.append(records_table(value, f"{title} {label(key)}".strip()))
        elif isinstance(value, dict) and len(value) > 6 and all(_scalar(v) for v in value.values()):
            tables.append(Table(["field", "value"], [[label(str(k)), num(v)] for k, v in value.items()],
                                caption=f"{title} {label(key)}".strip(), compact=True))
        else:
            rows.append([label(key), text(value)])
    return rows, tables


def records_table(records: list[dict[str, Any]], caption: str = "") -> Table:
    columns: list[str] = []
    for record in records:
        columns += [k for k in record if k not in columns]
    return Table([label(c) for c in columns], [[text(r.get(c)) for c in columns] for r in records], caption=caption)
