"""Client errors as data: every problem with its field path, so a caller can fix a request in one round.

Why collect instead of raising at the first problem: a bedside app sending 40 fields should learn about
all the bad ones at once, and a list is easy to render next to the form fields.
"""

from __future__ import annotations

from typing import Any


class Problems(Exception):
    """One or more client errors; ``status`` is the HTTP status to answer with (always 4xx)."""

    def __init__(self, status: int, message: str, problems: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.problems = problems or []

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "problems": self.problems}

    def text(self) -> str:
        """One line for protocols whose errors are a bare string (Open Inference Protocol)."""
        if not self.problems:
            return self.message
        parts = [f"{p['field']}: {p['message']}" for p in self.problems[:20]]
        more = f"; and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        return f"{self.message}: " + "; ".join(parts) + more


def problem(
    field: str | tuple[str, int, str], kind: str, message: str, value: Any = None, expected: str | None = None
) -> dict:
    """``field`` may be ``(where, row, name)``: the path text is only built when there is a problem."""
    if isinstance(field, tuple):
        field = f"{field[0]}[{field[1]}].{field[2]}"
    out: dict[str, Any] = {"field": field, "kind": kind, "message": message}
    if value is not None:
        out["value"] = _short(value)
    if expected is not None:
        out["expected"] = expected
    return out


def _short(value: Any) -> Any:
    """Echo the offending value, but never a megabyte of it back."""
    if isinstance(value, str | bytes) and len(value) > 80:
        return value[:80] + "..."
    if isinstance(value, list | dict):
        text = repr(value)
        return text[:80] + ("..." if len(text) > 80 else "")
    return value


def invalid(
    field: str, kind: str, message: str, value: Any = None, expected: str | None = None, status: int = 422
) -> Problems:
    """The one-problem case: a request that is wrong as a whole (not a list, empty, unknown format)."""
    return Problems(status, "invalid input", [problem(field, kind, message, value=value, expected=expected)])
