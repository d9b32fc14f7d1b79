"""What a request will cost, counted before any of it runs.

Work is counted in characters: each one the model reads (a prompt, a context, a fed or scored
text) or writes (up to max_new_chars per choice), and each alternative returned with a character
(top_logprobs, logprobs) as one more, since it costs a sort and its bytes on the wire. One
request may do at most CHARSTREAM_MAX_REQUEST_WORK; past it the answer is 413 naming the fields
that multiply the work, before anything is read. The same count is what the caller's chars_per_s
limit is charged (service/api/quotas.py), so a key's rate limits work, not requests.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import HTTPConnection

from service.api.quotas import charge_chars
from service.core import SamplingParams
from service.errors import TooLarge
from service.settings import Settings

GENERATE_FIELDS = "prompt, max_new_chars, top_logprobs"


@dataclass(frozen=True)
class Work:
    chars: int
    fields: str  # the request's fields that make the work, for the error
    formula: str  # how they make it, with the request's numbers


def generation(params: SamplingParams, prompt_chars: int, choices: int = 1, fields: str = GENERATE_FIELDS) -> Work:
    """A prompt read once, then `choices` generations of up to max_new_chars, each character with its
    top_logprobs alternatives (the prompt's too, when its characters are annotated)."""
    alternatives = params.top_logprobs
    read = prompt_chars * (1 + (alternatives if params.prompt_logprobs else 0))
    written = choices * params.max_new_chars * (1 + alternatives)
    each = f"{params.max_new_chars} chars x (1 + {alternatives} alternatives)"
    formula = f"{prompt_chars} prompt chars + {choices} choices x {each}"
    return Work(read + written, fields, formula)


def reading(chars: int, alternatives: int, fields: str) -> Work:
    """Text read teacher-forced (scored or fed), each character with `alternatives` more."""
    return Work(chars * (1 + alternatives), fields, f"{chars} chars x (1 + {alternatives})")


def check(settings: Settings, work: Work) -> None:
    limit = settings.max_request_work
    if work.chars > limit:
        raise TooLarge(
            f"this request's work is {work.chars:,} characters ({work.formula}); one request may do at most "
            f"{limit:,} (CHARSTREAM_MAX_REQUEST_WORK): ask for less",
            field=work.fields,
        )


async def admit(conn: HTTPConnection, work: Work) -> None:
    """413 for work over one request's budget; else charge it to the caller's chars_per_s (429 when spent)."""
    check(conn.app.state.settings, work)
    await charge_chars(conn, work.chars)
