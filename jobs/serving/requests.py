"""Reading a ``POST /predict`` body: ``{"task": "...", "inputs": ["text", ...]}``, every problem a 4xx.

``parse_predict`` returns a ``Query`` or raises ``RequestError`` with the HTTP status and the reason:
400 for a body that is not a JSON object with both fields, 422 for fields of the wrong type or size.
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


def parse_predict(body: bytes, limits: Limits) -> Query:
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"the body is {len(body)} bytes; at most {limits.max_body_bytes} are accepted")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as err:
        raise RequestError(400, f"the body is not JSON ({err}); send {_EXAMPLE}") from None
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
    return Query(task=task, inputs=tuple(inputs))


_EXAMPLE = '{"task": "NAME", "inputs": ["text", ...]}'
