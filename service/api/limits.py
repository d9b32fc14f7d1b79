"""Limits of request fields: the fixed bound every schema shares, and the limits that only the settings
and the loaded models know, written into the OpenAPI schema.

Pydantic's schema states the fixed bounds (temperature 0..10, at most 8 stop sequences). The
rest (max_new_chars up to CHARSTREAM_MAX_NEW_CHARS, prompts up to CHARSTREAM_MAX_PROMPT_CHARS and
made of the default model's characters, top_k up to the vocabulary size, which layers and units
exist) are written in here, so that a client generated from the schema, or a fuzzer, sends what
the server accepts, and the server accepts what the schema allows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.serving.registry import ModelRegistry
from service.settings import Settings

# Integers a request may send where numpy reads them (an int64 array, a count): both APIs' bound.
MAX_INT = 2**31 - 1
# Request schemas and their text fields read by the model.
TEXT_FIELDS = {
    "GenerateRequest": "prompt",
    "SessionGenerateRequest": "prompt",
    "CreateSessionRequest": "prompt",
    "FeedRequest": "text",
}
SAMPLING_SCHEMAS = ("GenerateRequest", "SessionGenerateRequest")


def char_class(chars: tuple[str, ...]) -> str:
    """A regex matching any run of these characters (and nothing else)."""
    escaped = "".join("\\" + c if c in "\\]^-[" else c for c in chars)
    return f"^[{escaped}]*$"


def with_model_limits(app: FastAPI, settings: Settings, registry: Callable[[], ModelRegistry | None]) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes, description=app.description
        )
        models = registry()
        if models is not None and models.ready:
            apply_limits(schema, settings, models)
            app.openapi_schema = schema  # complete: keep it (before the models load, build it again)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def apply_limits(schema: dict[str, Any], settings: Settings, registry: ModelRegistry) -> None:
    components = schema.get("components", {}).get("schemas", {})
    infos = [m.engine.info for m in registry.models.values()]
    default = registry.get(None).engine.info
    for name, field in TEXT_FIELDS.items():
        props = components.get(name, {}).get("properties", {})
        if field in props:
            props[field]["maxLength"] = settings.max_prompt_chars
            props[field]["pattern"] = char_class(default.vocab)
        if "model" in props:
            props["model"] = {"anyOf": [{"enum": sorted(registry.models)}, {"type": "null"}], "title": "Model"}
    for name in SAMPLING_SCHEMAS:
        props = components.get(name, {}).get("properties", {})
        if "max_new_chars" in props:
            props["max_new_chars"]["maximum"] = settings.max_new_chars
        if "top_k" in props:
            props["top_k"]["maximum"] = min(i.vocab_size for i in infos)
        if "top_logprobs" in props:
            props["top_logprobs"]["maximum"] = min(props["top_logprobs"].get("maximum", 20), default.vocab_size)
    activation = components.get("ActivationRequest", {}).get("properties", {})
    if activation:
        activation["layer"]["maximum"] = min(i.num_layers for i in infos) - 1
        activation["units"]["items"]["maximum"] = min(i.hidden_size for i in infos) - 1
        if any(len(i.state_names) < 2 for i in infos):
            activation["state"] = {"const": "h", "default": "h", "type": "string", "title": "State"}
    steer = components.get("SteerRequest", {}).get("properties", {})
    if steer:  # the same units as activations
        steer["layer"]["maximum"] = min(i.num_layers for i in infos) - 1
        steer["unit"]["maximum"] = min(i.hidden_size for i in infos) - 1
        if any(len(i.state_names) < 2 for i in infos):
            steer["state"] = {"const": "h", "default": "h", "type": "string", "title": "State"}
    score = components.get("ScoreRequest", {}).get("properties", {})
    if score:  # each text and the context: the default model's characters, as prompts
        text = {"maxLength": settings.max_prompt_chars, "pattern": char_class(default.vocab)}
        score["texts"]["items"].update(text)
        score["context"].update(text)
        score["model"] = {"anyOf": [{"enum": sorted(registry.models)}, {"type": "null"}], "title": "Model"}
        score["top_logprobs"]["maximum"] = min(score["top_logprobs"]["maximum"], default.vocab_size)
    completion = components.get("CompletionRequest", {}).get("properties", {})
    if completion:  # OpenAI's completions: the same limits under OpenAI's names
        text = {"maxLength": settings.max_prompt_chars, "pattern": char_class(default.vocab)}
        completion["prompt"]["anyOf"][0].update(text)
        completion["prompt"]["anyOf"][1]["items"].update(text)
        completion["model"] = {"enum": sorted(registry.models), "title": "Model", "type": "string"}
        vocab = min(i.vocab_size for i in infos)
        for name, maximum in (("max_tokens", settings.max_new_chars), ("top_k", vocab), ("logprobs", vocab)):
            number = completion[name]["anyOf"][0]
            number["maximum"] = min(number["maximum"], maximum)
        if "logit_bias" in completion:  # keys are character ids: the positions the vocabulary has
            completion["logit_bias"]["anyOf"][0]["propertyNames"] = {
                "pattern": f"^({'|'.join(map(str, range(vocab)))})$"
            }
