"""The base of zipserve's config models: a misspelled option must fail loudly, not run without it.

Unknown keys are refused (pydantic's extra="forbid") with a message that names them and lists the known
ones, so the fix is in the message. Values are checked strictly (no `"8"` for 8, no `true` for 1), as a
config file is written by hand and a coerced value hides the mistake.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError


class ConfigModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    key_kind: ClassVar[str] = "key"  # what the unknown-key error calls this model's keys

    @model_validator(mode="wrap")
    @classmethod
    def _name_unknown_keys(cls, data, handler):
        """pydantic's extra_forbidden errors, one per key, as one error naming them and the known keys."""
        try:
            return handler(data)
        except ValidationError as e:
            unknown = [str(err["loc"][0]) for err in e.errors()
                       if err["type"] == "extra_forbidden" and len(err["loc"]) == 1]
            if not unknown:
                raise
            known = ", ".join(sorted(f.alias or name for name, f in cls.model_fields.items()))
            raise PydanticCustomError("unknown_keys", "unknown {kind}(s): {unknown}; known: {known}",
                                      {"kind": cls.key_kind, "unknown": ", ".join(unknown), "known": known}) from None


def error_summary(e: ValidationError) -> str:
    """A validation error in one line: each problem as `field: message` (for logs and error files)."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
