"""The structured-outputs schema both API families share: what it hands the core, and its limits."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from service.api.structured import MAX_CONSTRAINT_CHARS, StructuredOutputs


def test_a_json_schema_keeps_its_key_order() -> None:
    """The core generates JSON Schema properties in the order of the spec's source."""
    schema = {"type": "object", "properties": {"size": {"enum": ["S", "M"]}, "id": {"type": "integer"}}}
    spec = StructuredOutputs.model_validate({"json": schema}).to_spec()
    assert (spec.kind, spec.field) == ("json", "structured_outputs.json")
    assert list(json.loads(spec.source)["properties"]) == ["size", "id"]


@pytest.mark.parametrize(
    ("body", "kind", "field"),
    [
        ({"regex": "a+"}, "regex", "structured_outputs.regex"),
        ({"choice": ["a", "b"]}, "choice", "structured_outputs.choice"),
        ({"grammar": 'start: "a"'}, "grammar", "structured_outputs.grammar"),
    ],
)
def test_each_kind_names_its_field(body: dict[str, object], kind: str, field: str) -> None:
    spec = StructuredOutputs.model_validate(body).to_spec()
    assert (spec.kind, spec.field) == (kind, field)


@pytest.mark.parametrize(
    "body",
    [{}, {"regex": "a", "choice": ["a"]}, {"regex": None}, {"json": {"enum": ["x" * MAX_CONSTRAINT_CHARS]}}],
)
def test_exactly_one_within_limits(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        StructuredOutputs.model_validate(body)
