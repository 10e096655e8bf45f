"""Reading a ``POST /predict`` body: ``{"task": "...", "inputs": ["text", ...]}``, every problem a 4xx.

``parse_predict`` returns a ``Query`` or raises ``RequestError`` with the HTTP status and the reason:
400 for a body that is not a JSON object with both fields (or nests deeper than Python can read), 413 for
a body over ``Limits.max_body_bytes`` (``check_size``, which the app also applies while it reads the body),
422 for fields of the wrong type or size, or an input that is not valid Unicode (a lone surrogate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from share.errors import ShareClError

FIELDS = ("task", "inputs")


class RequestError(ShareClError):
    """A request the server refuses; ``status`` is its HTTP status, the message the reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Query:
    task: str
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class Limits:
    max_inputs: int = 64  # texts per request
    max_chars: int = 20_000  # characters per text (the tokenizer truncates to max_length tokens anyway)
    max_body_bytes: int = 4 * 1024 * 1024


def check_size(size: int, limits: Limits, *, so_far: bool = False) -> None:
    """A 413 ``RequestError`` if a body of ``size`` bytes (``so_far``: of ``size`` bytes read, and more coming)
    is over ``limits.max_body_bytes``."""
    if size > limits.max_body_bytes:
        said = f"over {limits.max_body_bytes}" if so_far else str(size)
        raise RequestError(413, f"the body is {said} bytes; at most {limits.max_body_bytes} are accepted")


def parse_predict(body: bytes, limits: Limits) -> Query:
    check_size(len(body), limits)
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as err:
        raise RequestError(400, f"the body is not JSON ({err}); send {_EXAMPLE}") from None
    except RecursionError:
        raise RequestError(400, f"the body nests JSON arrays or objects too deeply to read; send {_EXAMPLE}") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(data).__name__}; send {_EXAMPLE}")
    missing = [f for f in FIELDS if f not in data]
    if missing:
        raise RequestError(400, f"the body lacks {' and '.join(repr(f) for f in missing)}; send {_EXAMPLE}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise RequestError(422, f"unknown field(s) {unknown}; a request has only {list(FIELDS)}")
    task, inputs = data["task"], data["inputs"]
    if not isinstance(task, str) or not task:
        raise RequestError(422, f"'task' must be a non-empty string (a task name), got {task!r}")
    if not isinstance(inputs, list):
        raise RequestError(422, f"'inputs' must be a list of strings, got {type(inputs).__name__}")
    if not inputs:
        raise RequestError(422, "'inputs' is empty; send at least one text")
    if len(inputs) > limits.max_inputs:
        raise RequestError(
            422, f"'inputs' holds {len(inputs)} texts; at most {limits.max_inputs} per request: split it"
        )
    for i, text in enumerate(inputs):
        if not isinstance(text, str):
            raise RequestError(422, f"inputs[{i}] must be a string, got {type(text).__name__}")
        if not text.strip():
            raise RequestError(422, f"inputs[{i}] is empty; every input must hold some text")
        if len(text) > limits.max_chars:
            raise RequestError(422, f"inputs[{i}] has {len(text)} characters; at most {limits.max_chars}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # JSON's escape of half a surrogate pair (\ud800) decodes to this
            raise RequestError(
                422,
                f"inputs[{i}] is not valid Unicode ({err.reason} at character {err.start}); escape a character "
                "beyond U+FFFF as its whole surrogate pair, or send it unescaped",
            ) from None
    return Query(task=task, inputs=tuple(inputs))


_EXAMPLE = '{"task": "NAME", "inputs": ["text", ...]}'
