"""Request and response schemas of the HTTP and WebSocket API; no serving code is imported here."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from exports.sampling import TEMPERATURE_MAX
from service.api.limits import MAX_INT
from service.api.structured import StructuredOutputs, exactly_one_of, one_given
from service.core.sampling import ActivationSpec, SamplingParams, SteerSpec
from service.sessions.store import Session

# Bounds every number must meet before it reaches numpy (an int64 array, a uint64 seed). The
# limits that depend on the model or the settings (vocabulary size, max_new_chars, prompt length)
# are checked by the serving layer, and limits.py writes them into the OpenAPI schema.
MAX_UNITS = 32
MAX_TOP_LOGPROBS = 20
MAX_STEER = 32
MAX_STEER_VALUE = 100.0  # an LSTM's cell state reaches tens; h stays within [-1, 1]

# Any uint64 is accepted; the schema states the largest one a JSON double holds exactly, so that a
# client writing the number as a float never rounds it past the limit (schemathesis did).
Seed = Annotated[
    int,
    Field(
        ge=0,
        le=2**64 - 1,
        description="seeds the session's RNG (any uint64)",
        json_schema_extra={"maximum": 2**64 - 2048},
    ),
]
SessionId = Annotated[str, Field(min_length=1, max_length=64, description="a session id from POST /v1/sessions")]
StopSequence = Annotated[str, Field(min_length=1, max_length=64)]
ModelId = Annotated[str, Field(min_length=1, max_length=128, description="model id; the server's default if unset")]
# A charstream-state, base64url: the bundled model's is about 11 KB; this bounds the largest models'.
StateText = Annotated[
    str,
    Field(
        min_length=1,
        max_length=4 * 2**20,
        pattern=r"^[A-Za-z0-9_-]+={0,2}$",
        description="a charstream-state (docs: Portable states), base64url; the request continues from it",
    ),
]
RETURN_STATE = "return the final state (a charstream-state, base64url) as `state`, to continue from later"


class ActivationRequest(BaseModel):
    """Which units' values to return per character (the state after the model read that character)."""

    model_config = ConfigDict(extra="forbid")

    layer: int = Field(ge=0, le=MAX_INT, description="layer, from 0")
    state: Literal["h", "c"] = Field(default="h", description="h (hidden state) or c (LSTM cell state)")
    units: list[Annotated[int, Field(ge=0, le=MAX_INT)]] = Field(
        min_length=1,
        max_length=MAX_UNITS,
        description=f"unit indices, at most {MAX_UNITS}, no repeats",
        json_schema_extra={"uniqueItems": True},
    )
    prompt: bool = Field(default=False, description="also return them for each prompt character")

    @field_validator("units")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("units must not repeat")
        return value

    def to_spec(self) -> ActivationSpec:
        # The contract orders state tensors h, then c (LSTM only).
        return ActivationSpec(self.layer, 0 if self.state == "h" else 1, tuple(self.units), self.prompt)


class SteerRequest(BaseModel):
    """A unit written after every step: clamped to `value`, or offset by `add` (exactly one)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra=exactly_one_of("value", "add"))

    layer: int = Field(ge=0, le=MAX_INT, description="layer, from 0")
    state: Literal["h", "c"] = Field(default="h", description="h (hidden state) or c (LSTM cell state)")
    unit: int = Field(ge=0, le=MAX_INT, description="unit index")
    value: float | None = Field(
        default=None, ge=-MAX_STEER_VALUE, le=MAX_STEER_VALUE, description="clamp the unit to this value"
    )
    add: float | None = Field(default=None, ge=-MAX_STEER_VALUE, le=MAX_STEER_VALUE, description="offset the unit")

    @model_validator(mode="after")
    def _value_or_add(self) -> SteerRequest:
        one_given(self, ("value", "add"), "give exactly one of value or add")
        return self

    def to_spec(self) -> SteerSpec:
        return SteerSpec(self.layer, 0 if self.state == "h" else 1, self.unit, self.value, self.add)


def steer_specs(entries: list[SteerRequest]) -> tuple[SteerSpec, ...]:
    # An offset of 0 changes nothing: dropped, so that `add: 0` is exactly no steering.
    return tuple(e.to_spec() for e in entries if e.add != 0.0)


class SamplingFields(BaseModel):
    """Sampling parameters; unset fields take the server's defaults."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_new_chars: int = Field(default=256, ge=1, le=MAX_INT, description="characters to generate at most")
    temperature: float = Field(default=1.0, ge=0.0, le=TEMPERATURE_MAX, description="0 = greedy")
    top_k: int = Field(default=0, ge=0, le=MAX_INT, description="keep the k most likely characters; 0 = off")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus mass to keep; 1 = off")
    stop: list[StopSequence] = Field(default_factory=list, max_length=8, description="stop sequences (not returned)")
    logprobs: bool = Field(default=False, description="return the model's log-probability of each character")
    top_logprobs: int = Field(
        default=0, ge=0, le=MAX_TOP_LOGPROBS, description="the N most likely characters at each position; 0 = off"
    )
    activations: ActivationRequest | None = Field(default=None, description="unit values to return per character")
    min_p: float = Field(
        default=0.0, ge=0.0, le=1.0, description="drop characters under min_p times the likeliest one; 0 = off"
    )
    repetition_penalty: float = Field(
        default=1.0,
        ge=0.01,
        le=10.0,
        description="vLLM's: divides positive (multiplies negative) logits of characters already in the prompt or "
        "output; 1 = off",
    )
    structured_outputs: StructuredOutputs | None = Field(
        default=None, description="constrain the output: exactly one of regex, choice, json or grammar"
    )
    steer: list[SteerRequest] = Field(
        default_factory=list, max_length=MAX_STEER, description=f"units written after every step, at most {MAX_STEER}"
    )

    def to_sampling_params(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            max_new_chars=self.max_new_chars,
            stop=tuple(self.stop),
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs,
            activations=None if self.activations is None else self.activations.to_spec(),
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            constraint=None if self.structured_outputs is None else self.structured_outputs.to_spec(),
            steer=steer_specs(self.steer),
        )


class GenerateRequest(SamplingFields):
    model: ModelId | None = None
    prompt: str = Field(default="", description="text the model reads before generating")
    seed: Seed | None = None
    stream: bool = Field(default=False, description="answer as Server-Sent Events")
    session_id: SessionId | None = Field(default=None, description="continue this session and keep its new state")
    state: StateText | None = None
    return_state: bool = Field(default=False, description=RETURN_STATE)


class SessionGenerateRequest(SamplingFields):
    prompt: str = Field(default="", description="text appended to the session before generating")
    stream: bool = False


class Usage(BaseModel):
    prompt_chars: int
    generated_chars: int


class GenerateResponse(BaseModel):
    text: str
    finish_reason: Literal["length", "stop", "cancelled"]
    usage: Usage
    model: str
    session_id: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[str, float]] | None = None
    activations: list[list[float]] | None = None
    prompt_activations: list[list[float]] | None = None
    state: str | None = Field(default=None, description="the final state, when return_state asked for it")


class CreateSessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelId | None = None
    prompt: str = Field(default="", description="text the session reads at creation (after `state`, if given)")
    seed: Seed | None = None
    state: StateText | None = Field(default=None, description="a charstream-state the session starts from")


class StateInfo(BaseModel):
    format: str = Field(description="charstream-state")
    version: int
    model: str
    position: int = Field(description="characters the state has read")
    state: str = Field(description="the state, base64url (or the body itself with Accept: application/octet-stream)")


class ForkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: Seed | None = Field(default=None, description="a new seed for the fork; unset keeps the RNG stream")


class FeedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, description="text the session reads without generating")
    logprobs: bool = Field(default=False, description="return the model's log-probability of each fed character")
    top_g: int | None = Field(
        default=None,
        ge=1,
        le=MAX_INT,
        description="return the positions of the fed characters that fell outside the model's g most likely "
        "(DeepLog's anomaly test)",
    )


class SessionInfo(BaseModel):
    id: str
    object: Literal["session"] = "session"
    model: str
    seed: int
    history_chars: int
    created_at: float
    expires_at: float
    state_bytes: int

    @classmethod
    def of(cls, session: Session) -> SessionInfo:
        return cls(
            id=session.id,
            model=session.model,
            seed=session.seed,
            history_chars=session.history_chars,
            created_at=session.created_at,
            expires_at=session.expires_at,
            state_bytes=session.state_bytes,
        )


class FeedResponse(BaseModel):
    session: SessionInfo
    usage: Usage
    logprobs: list[float | None] | None = Field(
        default=None, description="per fed character; null for a first character that nothing predicted"
    )
    outside_top_g: list[int] | None = Field(
        default=None, description="positions (from 0) of fed characters outside the model's top_g predictions"
    )


MAX_SCORE_TEXTS = 1_000


class ScoreRequest(BaseModel):
    """Texts to score: each read teacher-forced after `context`, its characters' log-probabilities summed."""

    model_config = ConfigDict(extra="forbid")

    model: ModelId | None = None
    texts: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, max_length=MAX_SCORE_TEXTS, description=f"texts to score, at most {MAX_SCORE_TEXTS}"
    )
    context: str = Field(
        default="", description="text read before each text (unscored); a line break when empty, as generation starts"
    )
    logprobs: bool = Field(default=False, description="also return each character's log-probability")
    top_logprobs: int = Field(
        default=0, ge=0, le=MAX_TOP_LOGPROBS, description="the N most likely characters at each position; 0 = off"
    )


class TextScore(BaseModel):
    nll: float = Field(description="negative log-likelihood of the text, in nats, summed over its characters")
    chars: int
    nats_per_char: float
    bits_per_char: float
    logprobs: list[float] | None = None
    top_logprobs: list[dict[str, float]] | None = None


class ScoreResponse(BaseModel):
    model: str
    scores: list[TextScore]


# WebSocket messages from the client (the server's messages are documented in docs/api.md).
class WsGenerate(SamplingFields):
    type: Literal["generate"]
    session_id: SessionId | None = None
    model: ModelId | None = None
    prompt: str = ""
    seed: Seed | None = None
    state: StateText | None = Field(default=None, description="start the connection's session anew from this state")
    return_state: bool = Field(default=False, description=RETURN_STATE + " (in the done message)")


class WsFeed(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["feed"]
    text: str = Field(min_length=1)
    session_id: SessionId | None = None
    model: ModelId | None = None


class WsCancel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["cancel"]
