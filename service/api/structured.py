"""Request schemas both API families share: `StructuredOutputs` (native and OpenAI's completions take it
as `structured_outputs`; OpenAI's `response_format` is read into it) and the helpers that make a field
group "exactly one of"; no serving code is imported here."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.core.sampling import ConstraintSpec

MAX_CONSTRAINT_CHARS = 16_384  # a regex, grammar or JSON Schema (as JSON) at most this long
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1_000


def exactly_one_of(*names: str) -> Callable[[dict[str, Any]], None]:
    """A schema whose fields `names` are optional, never null, and exactly one of them is present."""

    def edit(schema: dict[str, Any]) -> None:
        for prop in schema.get("properties", {}).values():
            branches = prop.pop("anyOf", None)
            if branches is not None:
                prop.update(next(b for b in branches if b.get("type") != "null"))
                prop.pop("default", None)
        schema["oneOf"] = [{"required": [name]} for name in names]

    return edit


def one_given(model: BaseModel, names: tuple[str, ...], message: str) -> None:
    """Exactly one of the fields was sent, and not as null."""
    given = [n for n in names if n in model.model_fields_set]
    if len(given) != 1 or getattr(model, given[0]) is None:
        raise ValueError(message)


class StructuredOutputs(BaseModel):
    """What every generated text must match: exactly one of regex, choice, json or grammar (vLLM's names)."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra=exactly_one_of("regex", "choice", "json", "grammar"),
    )

    regex: str | None = Field(
        default=None, min_length=1, max_length=MAX_CONSTRAINT_CHARS, description="the whole output matches this regex"
    )
    choice: list[Annotated[str, Field(min_length=1, max_length=MAX_CHOICE_CHARS)]] | None = Field(
        default=None, min_length=1, max_length=MAX_CHOICES, description="the output is one of these strings"
    )
    json_schema: dict[str, Any] | None = Field(
        default=None, alias="json", description="the output is JSON valid under this JSON Schema"
    )
    grammar: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_CONSTRAINT_CHARS,
        description="the output is a sentence of this context-free grammar (Lark syntax, as llguidance reads it)",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        one_given(
            self, ("regex", "choice", "json_schema", "grammar"), "give exactly one of regex, choice, json or grammar"
        )
        if self.json_schema is not None and len(json.dumps(self.json_schema)) > MAX_CONSTRAINT_CHARS:
            raise ValueError(f"json is longer than {MAX_CONSTRAINT_CHARS} characters as JSON")
        return self

    def to_spec(self, field: str = "structured_outputs") -> ConstraintSpec:
        if self.regex is not None:
            return ConstraintSpec("regex", self.regex, f"{field}.regex")
        if self.choice is not None:
            return ConstraintSpec("choice", json.dumps(self.choice), f"{field}.choice")
        if self.json_schema is not None:
            # Key order kept: JSON Schema properties come out in the order the schema gives them.
            return ConstraintSpec("json", json.dumps(self.json_schema), f"{field}.json")
        assert self.grammar is not None
        return ConstraintSpec("grammar", self.grammar, f"{field}.grammar")
