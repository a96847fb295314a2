"""The base of every params schema: strict, frozen pydantic models whose errors become one line."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def describe(error: ValidationError, prefix: str) -> str:
    """First validation problem as one line: `prefix.key.path: message (got value)`."""
    first = error.errors()[0]
    location = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "[key]")
    got = f" (got {first['input']!r})" if first["type"] != "missing" and not isinstance(first["input"], dict) else ""
    return f"{location}: {first['msg']}{got}"
