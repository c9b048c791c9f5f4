"""A deterministic corpus of JSON schemas for constrained decoding (issue 16).

`corpus()` returns the same schemas on every call (seeded). They cover nested objects, arrays
with minItems/maxItems, enums and consts, anchored patterns, anyOf, nullable types,
required/optional mixes, string minLength/maxLength, integers and numbers with bounds,
booleans and nulls. Every top-level schema is an object (OpenAI's strict json_schema requires
it), and every object sets `additionalProperties: false`.

Length choice: the corpus is decoded by SmolLM2-135M on a small CPU, so valid outputs must be
short. Every array has a maxItems (at most 4), every integer a minimum and a maximum, every
number bounds and multipleOf 0.5 (so its digits are bounded too), and every string a maxLength
(at most 16) or a bounded pattern or enum, except in the "free_string" kind (one schema in
twelve), where one property is a plain `{"type": "string"}` with no length bound at all: the
model itself has to close it, and a small model may not (tests/e2e/test_schema_corpus.py says
how that is judged).
Every other schema's valid outputs are bounded in length.

`example(schema)` gives a valid instance of any corpus schema, everything filled in (for the
grammar-engine benchmark's documents, and to check the corpus itself).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

Schema = dict[str, Any]

KINDS = (
    "flat",
    "nested",
    "bounded_array",
    "array_of_objects",
    "enums",
    "patterns",
    "any_of",
    "nullable",
    "numbers",
    "string_lengths",
    "free_string",
    "all_optional",
)

WORDS = (
    "name", "city", "color", "count", "price", "active", "kind", "note", "code", "score",
    "level", "owner", "title", "status", "tag", "size", "rank", "label", "unit", "mode",
)  # fmt: skip
SUBJECTS = (
    "a book", "a city", "a user", "a product", "an order", "a song", "a planet", "a recipe",
    "a car", "a movie", "a team", "a tool",
)  # fmt: skip
# Anchored, bounded patterns that Python's re and llguidance's regex read alike, each with a
# string it matches (for example()).
PATTERN_EXAMPLES = {
    "^[a-z]{3,8}$": "hello",
    "^[A-Z]{2}-[0-9]{3}$": "AB-123",
    "^[0-9]{4}-[0-9]{2}-[0-9]{2}$": "2024-05-06",
    "^(red|green|blue)$": "green",
    "^[a-f0-9]{6}$": "a1b2c3",
    "^[A-Z][a-z]{1,9}$": "Paris",
    "^[+]?[0-9]{3,10}$": "+123456",
    "^v[0-9]{1,2}\\.[0-9]{1,2}$": "v1.2",
    "^[a-z]{1,5}(_[a-z]{1,5}){0,2}$": "snake_case",
    "^(yes|no|maybe)!?$": "maybe!",
}
PATTERNS = tuple(PATTERN_EXAMPLES)
STRING_ENUMS = (
    ["low", "medium", "high"],
    ["north", "south", "east", "west"],
    ["a", "b"],
    ["café", "naïve", "Köln"],
    ['say "hi"', "back\\slash", "tab\there"],
    ["x"],
)


@dataclass(frozen=True)
class CorpusSchema:
    name: str  # a valid OpenAI json_schema name: [a-zA-Z0-9_-]
    kind: str
    subject: str  # what the prompt asks for
    schema: Schema

    @property
    def prompt(self) -> str:
        return f"Describe {self.subject} as JSON."


def corpus(count: int = 240, seed: int = 16) -> list[CorpusSchema]:
    """`count` schemas, kinds in rotation; schema i is drawn from its own seeded generator, so
    changing `count` never changes the schemas that remain."""
    out = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        rng = random.Random(seed * 100_003 + i)
        schema = _BUILDERS[kind](_Gen(rng))
        out.append(CorpusSchema(f"s{i:03d}_{kind}", kind, rng.choice(SUBJECTS), schema))
    return out


def example(schema: Schema) -> Any:
    """A valid instance of a corpus schema that fills everything it may: every property, arrays
    at maxItems, strings at maxLength (up to 16 characters), the first anyOf branch."""
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][-1]
    if "anyOf" in schema:
        return example(schema["anyOf"][0])
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = kind[0]
    if kind == "object":
        return {name: example(sub) for name, sub in schema["properties"].items()}
    if kind == "array":
        return [example(schema["items"]) for _ in range(schema.get("maxItems", 2))]
    if kind == "string":
        if "pattern" in schema:
            return PATTERN_EXAMPLES[schema["pattern"]]
        return "the quick brown fox"[: schema.get("maxLength", 16)]
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        high = schema.get("maximum", schema.get("exclusiveMaximum", low + 100))
        middle = (low + high) // 2
        return middle if kind == "integer" else middle + 0.5
    if kind == "boolean":
        return True
    return None


@dataclass
class _Gen:
    rng: random.Random

    def names(self, count: int) -> list[str]:
        return self.rng.sample(WORDS, count)

    def obj(self, props: dict[str, Schema], required: list[str] | None = None) -> Schema:
        # required=None: a random mix (at least one required when there are properties).
        if required is None:
            keys = list(props)
            required = [k for k in keys if self.rng.random() < 0.6] or keys[:1]
        return {
            "type": "object",
            "properties": props,
            "required": required,
            "additionalProperties": False,
        }

    def bounded_string(self) -> Schema:
        low = self.rng.choice([0, 0, 1, 2, 3])
        return {"type": "string", "minLength": low, "maxLength": self.rng.randint(max(low, 4), 16)}

    def integer(self) -> Schema:
        choice = self.rng.randrange(4)
        if choice == 0:
            low = self.rng.randint(-50, 50)
            return {"type": "integer", "minimum": low, "maximum": low + self.rng.randint(0, 500)}
        if choice == 1:
            return {"type": "integer", "minimum": 0, "maximum": 100_000}
        if choice == 2:
            low = self.rng.randint(-10, 10)
            return {"type": "integer", "exclusiveMinimum": low, "exclusiveMaximum": low + 20}
        return {"type": "integer", "minimum": -1000, "maximum": 1000}

    def number(self) -> Schema:
        # multipleOf 0.5 bounds the fraction digits (a float's digits are otherwise endless),
        # and is exact in binary, so jsonschema checks it without rounding trouble.
        choice = self.rng.randrange(3)
        if choice == 0:
            return {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.5}
        if choice == 1:
            low = self.rng.randint(-100, 100)
            return {"type": "number", "minimum": low, "maximum": low + 1000, "multipleOf": 0.5}
        return {"type": "number", "exclusiveMinimum": 0, "maximum": 100, "multipleOf": 0.5}

    def enum(self) -> Schema:
        choice = self.rng.randrange(4)
        if choice == 0:
            return {"type": "string", "enum": list(self.rng.choice(STRING_ENUMS))}
        if choice == 1:
            return {"type": "integer", "enum": self.rng.sample(range(-5, 100), 4)}
        if choice == 2:
            return {"enum": ["on", 1, 2.5, True, None]}
        return {"const": self.rng.choice(["fixed", 42, False])}

    def pattern(self) -> Schema:
        return {"type": "string", "pattern": self.rng.choice(PATTERNS)}

    def leaf(self) -> Schema:
        makers = [
            self.bounded_string,
            self.integer,
            self.number,
            self.enum,
            self.pattern,
            lambda: {"type": "boolean"},
            lambda: {"type": "null"},
        ]
        return self.rng.choice(makers)()

    def leaves(self, count: int) -> dict[str, Schema]:
        return {name: self.leaf() for name in self.names(count)}

    def array(self, items: Schema) -> Schema:
        low = self.rng.randint(0, 2)
        return {
            "type": "array",
            "items": items,
            "minItems": low,
            "maxItems": low + self.rng.randint(0, 2),
        }


def _flat(g: _Gen) -> Schema:
    return g.obj(g.leaves(g.rng.randint(2, 4)))


def _nested(g: _Gen) -> Schema:
    inner = g.obj(g.leaves(g.rng.randint(1, 3)))
    if g.rng.random() < 0.5:
        # Three levels deep.
        inner = g.obj({**g.leaves(1), "detail": inner}, required=None)
    return g.obj({**g.leaves(g.rng.randint(1, 2)), "info": inner})


def _bounded_array(g: _Gen) -> Schema:
    items = g.rng.choice([g.bounded_string, g.integer, g.enum, lambda: {"type": "boolean"}])()
    return g.obj({"items": g.array(items), **g.leaves(1)}, required=["items"])


def _array_of_objects(g: _Gen) -> Schema:
    item = g.obj(g.leaves(g.rng.randint(1, 2)))
    return g.obj({"rows": g.array(item)}, required=["rows"])


def _enums(g: _Gen) -> Schema:
    return g.obj({name: g.enum() for name in g.names(g.rng.randint(1, 3))})


def _patterns(g: _Gen) -> Schema:
    return g.obj({name: g.pattern() for name in g.names(g.rng.randint(1, 3))})


def _any_of(g: _Gen) -> Schema:
    choice = g.rng.randrange(3)
    if choice == 0:
        value: Schema = {"anyOf": [g.bounded_string(), g.integer()]}
    elif choice == 1:
        value = {"anyOf": [g.enum(), g.pattern(), {"type": "boolean"}]}
    else:
        a, b = g.names(2)
        value = {"anyOf": [g.obj({a: g.leaf()}, [a]), g.obj({b: g.integer()}, [b])]}
    return g.obj({"value": value, **g.leaves(1)}, required=["value"])


def _nullable(g: _Gen) -> Schema:
    props = {}
    for name in g.names(g.rng.randint(1, 3)):
        if g.rng.random() < 0.5:
            props[name] = {"type": ["string", "null"], "maxLength": g.rng.randint(3, 12)}
        else:
            props[name] = {"anyOf": [g.leaf(), {"type": "null"}]}
    return g.obj(props)


def _numbers(g: _Gen) -> Schema:
    return g.obj({name: g.rng.choice([g.integer, g.number])() for name in g.names(3)})


def _string_lengths(g: _Gen) -> Schema:
    props = {name: g.bounded_string() for name in g.names(g.rng.randint(1, 3))}
    props["exact"] = {"type": "string", "minLength": 3, "maxLength": 3}
    return g.obj(props)


def _free_string(g: _Gen) -> Schema:
    return g.obj({"text": {"type": "string"}, **g.leaves(1)}, required=["text"])


def _all_optional(g: _Gen) -> Schema:
    return g.obj(g.leaves(g.rng.randint(1, 4)), required=[])


_BUILDERS = {
    "flat": _flat,
    "nested": _nested,
    "bounded_array": _bounded_array,
    "array_of_objects": _array_of_objects,
    "enums": _enums,
    "patterns": _patterns,
    "any_of": _any_of,
    "nullable": _nullable,
    "numbers": _numbers,
    "string_lengths": _string_lengths,
    "free_string": _free_string,
    "all_optional": _all_optional,
}
