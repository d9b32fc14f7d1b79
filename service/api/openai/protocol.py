"""Request and response schemas of OpenAI's legacy Completions API as charstream serves it.

No serving code is imported here. A token is one character: `max_tokens` counts characters,
`logprobs` gives per-character alternatives, `usage` counts characters.

Fields OpenAI defines that a character model cannot honour are declared so that they can be
refused by name (400 with a message that says why) rather than silently ignored; their schema
states the one value that is accepted. Fields OpenAI does not define are accepted and ignored
(the serving layer logs them), as vLLM does.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from exports.sampling import TEMPERATURE_MAX
from service.api.limits import MAX_INT
from service.api.structured import StructuredOutputs
from service.core.sampling import ConstraintSpec, SamplingParams
from service.errors import InvalidInput

MAX_N = 1000  # choices per prompt: a library of samples in one request
MAX_PROMPTS = 16  # prompts per request
MAX_CHOICES = 1000  # choices per request, over all its prompts
MAX_LOGPROBS = 20
MAX_STOP = 8
MAX_STOP_CHARS = 64
DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for completions
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # any int64 (as vLLM) or uint64 (as charstream's own routes)

StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
# The schema states what is served: a string, or a list of strings (one batch of prompts). Token
# arrays are OpenAI's too, but a character model has no token ids to read: they are accepted by
# the parser only so that `check_supported` can refuse them with a message that says so.
PromptField = Annotated[
    str | list[str] | list[int] | list[list[int]],
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_PROMPTS},
            ],
            "description": "the text to continue, or a list of texts (each gets `n` choices)",
        }
    ),
]


MAX_LOGIT_BIAS = 300  # as OpenAI's API


def _only(value: object, description: str) -> Any:
    """A field whose schema admits one value (the neutral one) while the parser takes any, to refuse it by name."""
    return WithJsonSchema({"enum": [value, None] if value is not None else [None], "description": description})


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = Field(default=False, description="a last chunk with `usage` and no choices")


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`: a named JSON Schema."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(default="response", max_length=64)
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema", description="the JSON Schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: text (no constraint), any JSON object, or JSON valid under a schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @property
    def field(self) -> str:
        """The field a refused constraint names: the schema sent, or response_format itself for json_object."""
        return "response_format.json_schema" if self.type == "json_schema" else "response_format"

    def to_structured(self) -> StructuredOutputs | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputs.model_validate({"json": {"type": "object"}})
        if self.json_schema is None:
            raise InvalidInput(
                "response_format.json_schema is required when type is json_schema", field="response_format.json_schema"
            )
        try:
            return StructuredOutputs.model_validate({"json": self.json_schema.json_schema})
        except ValidationError as exc:
            message = exc.errors()[0]["msg"]
            raise InvalidInput(f"response_format.json_schema: {message}", field="response_format.json_schema") from exc


class CompletionRequest(BaseModel):
    """`POST /v1/completions`; null is the same as leaving a field out."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=128, description="a model id from GET /v1/models")
    prompt: PromptField = Field(description="a string, or a list of up to 16 strings (token ids are refused)")
    max_tokens: int | None = Field(
        default=None,
        ge=0,
        le=MAX_INT,
        description=f"characters to generate at most (a token is a character); {DEFAULT_MAX_TOKENS} if unset",
    )
    temperature: float | None = Field(default=None, ge=0.0, le=TEMPERATURE_MAX, description="0 = greedy; 1 if unset")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="nucleus mass to keep; 1 = off")
    top_k: int | None = Field(
        default=None, ge=-1, le=MAX_INT, description="the k most likely characters; 0 or -1 = off"
    )
    n: int | None = Field(
        default=None,
        ge=1,
        le=MAX_N,
        description=f"choices per prompt, each with its own state; n x prompts at most {MAX_CHOICES}",
    )
    unique: bool | None = Field(
        default=False,
        description="charstream's extension: no two choices of a prompt have the same text (a repeat is sampled "
        "again with the next seed; fewer than n choices come back when the model cannot make n distinct texts)",
    )
    stream: bool | None = Field(default=False, description="answer as Server-Sent Events, ending in `data: [DONE]`")
    stream_options: StreamOptions | None = Field(
        default=None, description='{"include_usage": true}: a last chunk with usage and no choices'
    )
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = Field(
        default=None, description=f"up to {MAX_STOP} stop sequences (not returned)"
    )
    seed: int | None = Field(
        default=None,
        ge=SEED_MIN,
        le=SEED_MAX,
        description="makes sampling reproducible, every choice included",
        # The schema states bounds a JSON double holds exactly: a client that writes the number as a
        # float can never round it past the server's limits (schemathesis did).
        json_schema_extra={"minimum": SEED_MIN + 1024, "maximum": SEED_MAX - 2047},
    )
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="the log-probability of each character and of the N most likely alternatives",
    )
    echo: bool | None = Field(default=False, description="return the prompt before the completion")
    user: str | None = Field(default=None, description="accepted and ignored")
    session_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="charstream's extension: continue this server-kept session (POST /v1/sessions) and keep its state",
    )
    state: str | None = Field(
        default=None,
        min_length=1,
        max_length=4 * 2**20,
        pattern=r"^[A-Za-z0-9_-]+={0,2}$",
        description="charstream's extension: a charstream-state (base64url) every choice continues from",
    )
    return_state: bool | None = Field(
        default=False,
        description="charstream's extension: each choice carries its final state (base64url) as `state`",
    )
    # OpenAI's, refused unless neutral: see check_supported.
    suffix: Annotated[str | None, _only(None, "not supported: must be null")] = Field(
        default=None, description="refused unless null or empty: a character model continues left to right"
    )
    best_of: Annotated[int | None, _only(None, "not supported beyond best_of = n")] = Field(
        default=None, description="accepted only when null or equal to n"
    )
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        default=None,
        max_length=MAX_LOGIT_BIAS,
        description="character id (its vocabulary position, as a string) -> a bias from -100 to 100 added to its "
        "logit before sampling; -100 bans the character, 100 all but forces it",
    )
    frequency_penalty: float | None = Field(
        default=None,
        ge=-2.0,
        le=2.0,
        description="OpenAI's: minus this times a character's count in the output so far, from its logit; 0 = off",
    )
    presence_penalty: float | None = Field(
        default=None,
        ge=-2.0,
        le=2.0,
        description="OpenAI's: minus this from the logit of a character already in the output; 0 = off",
    )
    # vLLM's extensions (the `openai` client's extra_body).
    min_p: float | None = Field(
        default=None, ge=0.0, le=1.0, description="drop characters under min_p times the likeliest one; 0 = off"
    )
    repetition_penalty: float | None = Field(
        default=None,
        ge=0.01,
        le=10.0,
        description="vLLM's: divides positive (multiplies negative) logits of characters already seen; 1 = off",
    )
    structured_outputs: StructuredOutputs | None = Field(
        default=None, description="constrain the output (vLLM's name): exactly one of regex, choice, json or grammar"
    )
    response_format: ResponseFormat | None = Field(
        default=None, description="OpenAI's: json_object or json_schema constrain the output to JSON"
    )

    @property
    def prompts(self) -> list[str]:
        """The prompts as text (check_supported has refused token arrays)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        return [p for p in self.prompt if isinstance(p, str)]

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in stops if s)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)

    @property
    def ignored_fields(self) -> list[str]:
        """Fields OpenAI's API does not define: accepted and ignored."""
        return sorted(self.model_extra or {})

    def check_supported(self, vocab_size: int) -> None:
        """Refuse, naming the field, what a character model cannot do (the schema cannot say it all)."""
        prompt = self.prompt
        if isinstance(prompt, list):
            if not prompt:
                raise InvalidInput("prompt is an empty list: send a string, or a list of strings", field="prompt")
            if not all(isinstance(p, str) for p in prompt):
                raise InvalidInput(
                    "token-array prompts are not supported: this is a character model with no token ids; "
                    "send the text as a string (or a list of strings)",
                    field="prompt",
                )
            if len(prompt) > MAX_PROMPTS:
                raise InvalidInput(f"prompt has {len(prompt)} entries; at most {MAX_PROMPTS}", field="prompt")
        choices = len(self.prompts) * self.choices_per_prompt
        if choices > MAX_CHOICES:
            raise InvalidInput(f"n x prompts is {choices} choices; at most {MAX_CHOICES} per request", field="n")
        if self.state is not None and self.session_id is not None:
            raise InvalidInput("state and session_id: send one (a session keeps its own state)", field="state")
        if self.return_state and (self.stream or self.session_id is not None):
            raise InvalidInput(
                "return_state needs stream false and no session_id (GET /v1/sessions/{id}/state exports a session)",
                field="return_state",
            )
        if self.unique and (self.state is not None or self.return_state):
            raise InvalidInput(
                "unique with state or return_state is not supported: its retries start from no state",
                field="unique",
            )
        if self.unique and self.stream:
            raise InvalidInput(
                "unique needs each choice's whole text before it is sent: use stream false", field="unique"
            )
        if self.suffix:
            raise InvalidInput(
                "suffix is not supported: a character model continues text left to right and cannot fill in "
                "before a suffix",
                field="suffix",
            )
        if self.best_of is not None and self.best_of != self.choices_per_prompt:
            raise InvalidInput(
                f"best_of is {self.best_of} and n is {self.choices_per_prompt}: best_of is not supported (every "
                "choice generated is returned); leave best_of out or set it equal to n",
                field="best_of",
            )
        if (
            self.structured_outputs is not None
            and self.response_format is not None
            and self.response_format.type != "text"
        ):
            raise InvalidInput("give structured_outputs or response_format, not both", field="response_format")
        for key in self.logit_bias or {}:
            if not (key.isdecimal() and int(key) < vocab_size):
                raise InvalidInput(
                    f"logit_bias key {key[:20]!r} is not a character of model {self.model!r}: token ids here are "
                    f"vocabulary positions 0..{vocab_size - 1} (GET /v1/models/{self.model} lists the vocabulary size)",
                    field="logit_bias",
                )

    def to_sampling_params(self) -> SamplingParams:
        """Request values, then OpenAI's defaults (max_tokens 16, temperature 1, top_p 1)."""
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=max(self.top_k or 0, 0),
            top_p=1.0 if self.top_p is None else self.top_p,
            max_new_chars=DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens,
            stop=self.stops,
            logprobs=self.logprobs is not None,
            top_logprobs=self.logprobs or 0,
            prompt_logprobs=bool(self.echo) and self.logprobs is not None,
            logit_bias=tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items()),
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            constraint=self.constraint(),
        )

    def constraint(self) -> ConstraintSpec | None:
        if self.structured_outputs is not None:
            return self.structured_outputs.to_spec()
        if self.response_format is not None:
            structured = self.response_format.to_structured()
            if structured is not None:
                # Named as sent: response_format has no `json` field of its own.
                return dataclasses.replace(structured.to_spec(), field=self.response_format.field)
        return None


class CompletionLogprobs(BaseModel):
    """One entry per character; the first character of a prompt read from nothing has no logprob."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    state: str | None = Field(default=None, description="the choice's final state, when return_state asked")


class CompletionUsage(BaseModel):
    prompt_tokens: int = Field(description="prompt characters")
    completion_tokens: int = Field(description="generated characters")
    total_tokens: int


class CompletionResponse(BaseModel):
    """The answer, and (with `stream: true`) the shape of every chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None
    session_id: str | None = Field(default=None, description="the session the completion ran on, if any")


class OpenAIErrorBody(BaseModel):
    message: str
    type: str = Field(description="the error's class, as vLLM names it: BadRequestError, NotFoundError...")
    param: str | None = Field(default=None, description="the request field at fault")
    code: str | None = Field(default=None, description="charstream's error code: invalid_input, not_found...")


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorBody


class ModelCard(BaseModel):
    """OpenAI's model object; charstream's facts (cell, num_layers, hidden_size, vocab_size, val_loss...) as extras."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="when the model file was written (Unix seconds)")
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on an input list


class EmbeddingRequest(BaseModel):
    """`POST /v1/embeddings`: each input's vector is the model's top-layer state after reading it."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=128, description="a model id from GET /v1/models")
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    ) = Field(description=f"a text or a list of up to {MAX_EMBEDDING_INPUTS} (token ids are refused)")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="floats, or base64 of little-endian float32 (as OpenAI's)"
    )
    dimensions: int | None = Field(default=None, ge=1, description="keep the first N units (then normalised)")
    user: str | None = Field(default=None, description="accepted and ignored")

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int = Field(description="characters read")
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
