"""Constraints and their independent checks, shared by the constraint table and the tests.

Each case is a constraint as a request states it and a checker that does not use llguidance
(Python's `re`, `json` + `jsonschema`, set membership, a bracket counter). The tests run the
common cases on tiny models; `benchmarks/constraint_table.py` runs them and the further ones
on the bundled model, 1,000 samples each.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable

import jsonschema

from service.core import ConstraintSpec

Case = tuple[ConstraintSpec, Callable[[str], bool]]


def regex(pattern: str, python: str | None = None) -> Case:
    """A regex constraint, checked by Python's `re` (with `python`, a spelling `re` reads alike)."""
    return ConstraintSpec("regex", pattern), lambda t: re.fullmatch(python or pattern, t) is not None


def choice(options: list[str]) -> Case:
    return ConstraintSpec("choice", json.dumps(options)), lambda t: t in options


def schema(document: dict[str, object]) -> Case:
    def check(text: str) -> bool:
        try:
            jsonschema.validate(json.loads(text), document)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True

    return ConstraintSpec("json", json.dumps(document)), check


def balanced(text: str, complete: bool = True) -> bool:
    """Brackets () and [] properly nested (a prefix of such a text when not complete)."""
    stack: list[str] = []
    pairs = {")": "(", "]": "["}
    for c in text:
        if c in "([":
            stack.append(c)
        elif c in ")]" and (not stack or stack.pop() != pairs[c]):
            return False
    return not stack if complete else True


def _nested(t: str) -> bool:
    m = re.fullmatch(r"(a*)c(b*)", t)
    return m is not None and len(m.group(1)) == len(m.group(2))


# Bounded (every sample can finish) except the a^n c b^n grammar, whose samples may run out of
# characters while still in a's.
SHAKESPEARE_CASES: list[Case] = [
    regex(r"[A-Z][a-z]{2,6}"),
    regex(r"(ROMEO|JULIET|KING)"),
    regex(r"[a-z]{1,10} [a-z]{1,10}\."),
    regex(r"(Thou|thee|thy) [a-z]{1,8}!"),
    regex(r"[A-Z]{2,4}:\n[A-Z][a-z ,]{5,30}[.?!]"),
    regex(r"(ab|a)(c|bc)?d"),
    regex(r"[aeiou]{3}"),
    regex(r"((to|be), ){1,3}or not"),
    regex(r"[^a-zA-Z\n]{1,5}"),
    regex(r"\w{4} \w{4}", r"[A-Za-z0-9_]{4} [A-Za-z0-9_]{4}"),
    choice(["ROMEO", "JULIET", "KING HENRY VI", "a"]),
    choice(["yes", "no", "yesterday"]),
    (ConstraintSpec("grammar", 'start: "a" start "b" | "c"'), _nested),
    (
        ConstraintSpec("grammar", 'start: name ": " line\nname: /[A-Z]{3,8}/\nline: /[a-z ]{1,20}/ "."'),
        lambda t: re.fullmatch(r"[A-Z]{3,8}: [a-z ]{1,20}\.", t) is not None,
    ),
]

NESTED_SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {
        "size": {"enum": ["S", "M", "L"]},
        "inner": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": -50, "maximum": 50}, "ok": {"type": "boolean"}},
            "required": ["x", "ok"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "maxItems": 3},
    },
    "required": ["size", "inner", "tags"],
    "additionalProperties": False,
}
ID_ONLY: dict[str, object] = {
    "type": "object",
    "properties": {"id": {"type": "integer"}},
    "required": ["id"],
    "additionalProperties": False,
}

# On a model trained on `json_lines`: JSON Schemas (nested, enums) and numbers.
JSON_CASES: list[Case] = [
    schema(NESTED_SCHEMA),
    schema(ID_ONLY),
    schema({"enum": ["red", "green", 3, None]}),
    regex(r"[0-9]{5}"),
    regex(r"-?(0|[1-9][0-9]{0,3})\.[0-9]{2}"),
]


def json_lines(n: int, seed: int = 0) -> str:
    """JSON lines with nested objects, lists, enums and numbers, then a bracket group: a vocabulary
    JSON and brackets can be written in."""
    rng = random.Random(seed)
    words = ["red", "green", "blue", "alpha", "beta", "gamma", "x", "yz", "name", "id", "tags", "ok"]
    lines = []
    for _ in range(n):
        obj = {
            "name": rng.choice(words) + rng.choice(words),
            "id": rng.randint(0, 99999),
            "size": rng.choice(["S", "M", "L"]),
            "tags": [rng.choice(words) for _ in range(rng.randint(0, 3))],
            "ok": rng.choice([True, False, None]),
            "inner": {"x": rng.randint(-50, 50), "y": round(rng.random() * 10, 2)},
        }
        depth = rng.randint(0, 2)
        lines.append(json.dumps(obj) + " (" + "[" * depth + "a" + "]" * depth + ")")
    return "\n".join(lines) + "\n"
