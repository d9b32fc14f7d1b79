"""What a request can get wrong, checked before any work starts: its text against the model's
vocabulary and the settings' limits, and its sampling parameters against what only the model and
the settings can bound (the parameters check their own bounds). Each failure names the field, so a
bad request is an HTTP error and never a broken stream.
"""

from __future__ import annotations

from service.core.sampling import ActivationSpec, SamplingParams, SteerSpec
from service.errors import InvalidInput, TooLarge
from service.serving.registry import LoadedModel
from service.serving.resources import Resources
from service.sessions.store import Session
from service.settings import Settings

# What a session with no history reads first when the request brings no prompt.
DEFAULT_START = "\n"
# Per-character annotations of a prompt are read one character per step and sent as one event:
# bounded so that the answer stays a reasonable size (32 units x 10,000 characters ~ 3 MB of JSON).
MAX_ANNOTATED_PROMPT = 10_000


def prompt_ids(res: Resources, model: LoadedModel, text: str, field: str) -> list[int]:
    """`text` as the model's character ids, within CHARSTREAM_MAX_PROMPT_CHARS (counted in the metrics)."""
    limit = res.settings.max_prompt_chars
    if len(text) > limit:
        raise TooLarge(f"{field} has {len(text)} characters; the limit is {limit}", field=field)
    ids = res.registry.encode(model, text, field)
    res.metrics.prompt_chars.labels(model.id).inc(len(ids))
    return ids


def start_ids(res: Resources, model: LoadedModel, session: Session, prompt: str) -> list[int]:
    """What a job on `session` reads first: the prompt, or a line break when neither it nor the session has text."""
    ids = prompt_ids(res, model, prompt, "prompt")
    if not ids and session.logits is None:
        # Nothing to continue from: start where a text starts, at a line break.
        if DEFAULT_START not in model.engine.info.vocab_index:
            raise InvalidInput(
                "prompt is required: the session has no history and the model has no line break",
                field="prompt",
            )
        ids = [model.engine.info.vocab_index[DEFAULT_START]]
    return ids


def check_params(settings: Settings, model: LoadedModel, params: SamplingParams, prompt_chars: int) -> None:
    """What only the model and the settings can bound: 422 naming the field."""
    if params.max_new_chars > settings.max_new_chars:
        raise InvalidInput(
            f"max_new_chars is {params.max_new_chars}; the limit is {settings.max_new_chars}",
            field="max_new_chars",
        )
    check_vocab_count(model, params.top_k, "top_k")
    check_vocab_count(model, params.top_logprobs, "top_logprobs")
    if params.activations is not None:
        _check_activations(model, params.activations)
    for i, steer in enumerate(params.steer):
        _check_steer(model, steer, f"steer.{i}")
    if params.annotates_prompt and prompt_chars > MAX_ANNOTATED_PROMPT:
        raise TooLarge(
            f"prompt has {prompt_chars} characters; per-character annotations of a prompt are limited to "
            f"{MAX_ANNOTATED_PROMPT}",
            field="prompt",
        )


def check_vocab_count(model: LoadedModel, n: int, field: str) -> None:
    """A count of characters (`top_k`, `top_logprobs`) that the model's vocabulary must hold."""
    vocab_size = model.engine.info.vocab_size
    if n > vocab_size:
        raise InvalidInput(f"{field} is {n}; model {model.id!r} has {vocab_size} characters", field=field)


def _check_activations(model: LoadedModel, spec: ActivationSpec) -> None:
    info = model.engine.info
    if spec.layer >= info.num_layers:
        raise InvalidInput(
            f"activations.layer is {spec.layer}; model {model.id!r} has layers 0..{info.num_layers - 1}",
            field="activations.layer",
        )
    if spec.tensor >= len(info.state_names):
        raise InvalidInput(
            f"activations.state 'c' exists only for LSTM models; {model.id!r} is a {info.cell}: use 'h'",
            field="activations.state",
        )
    if max(spec.units) >= info.hidden_size:
        raise InvalidInput(
            f"activations.units has {max(spec.units)}; model {model.id!r} has units 0..{info.hidden_size - 1}",
            field="activations.units",
        )


def _check_steer(model: LoadedModel, steer: SteerSpec, field: str) -> None:
    info = model.engine.info
    if steer.layer >= info.num_layers:
        raise InvalidInput(
            f"{field}.layer is {steer.layer}; model {model.id!r} has layers 0..{info.num_layers - 1}",
            field=f"{field}.layer",
        )
    if steer.tensor >= len(info.state_names):
        raise InvalidInput(
            f"{field}.state 'c' exists only for LSTM models; {model.id!r} is a {info.cell}: use 'h'",
            field=f"{field}.state",
        )
    if steer.unit >= info.hidden_size:
        raise InvalidInput(
            f"{field}.unit is {steer.unit}; model {model.id!r} has units 0..{info.hidden_size - 1}",
            field=f"{field}.unit",
        )
