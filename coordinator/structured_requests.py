"""GenerateRequest.structured_output compiled into the regular expression the workers apply
(SamplingParams.output_regex; specpipe/sampling/structured_output.py).

A JSON schema goes through outlines-core's compiler (the one TGI and vLLM's "outlines" backend use); any JSON
object is the schema {"type": "object"}; choices are an alternation of the strings, escaped.
"""

from __future__ import annotations

import json

from outlines_core.json_schema import build_regex_from_schema

from specpipe.errors import InvalidArgumentError
from specpipe.v1 import coordinator_pb2

MAX_SCHEMA_CHARS = 65_536
MAX_CHOICES = 1024
# Rust regex's metacharacters (with those of its class syntax): escaped in a choice, the rest is literal.
REGEX_METACHARACTERS = frozenset("\\.+*?()|[]{}^$#&-~")

__all__ = ["output_regex"]


def output_regex(spec: coordinator_pb2.StructuredOutput) -> str:
    """The regular expression a StructuredOutput stands for; "" for none."""
    kind = spec.WhichOneof("constraint")
    if kind is None:
        return ""
    if kind == "regex":
        if not spec.regex:
            raise InvalidArgumentError("structured_output.regex must not be empty")
        return spec.regex
    if kind == "choice":
        choices = list(spec.choice.choices)
        if not choices or len(choices) > MAX_CHOICES or not all(choices):
            raise InvalidArgumentError(
                f"structured_output.choice must hold 1..{MAX_CHOICES} non-empty strings, got {len(choices)}"
            )
        return "(" + "|".join(_escaped(choice) for choice in choices) + ")"
    schema = '{"type": "object"}' if kind == "json_object" else spec.json_schema
    if len(schema) > MAX_SCHEMA_CHARS:
        raise InvalidArgumentError(
            f"structured_output.json_schema must be at most {MAX_SCHEMA_CHARS} characters, got {len(schema)}"
        )
    try:
        json.loads(schema)
        return build_regex_from_schema(schema)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise InvalidArgumentError(f"structured_output.json_schema: {exc}") from None


def _escaped(text: str) -> str:
    return "".join("\\" + char if char in REGEX_METACHARACTERS else char for char in text)
