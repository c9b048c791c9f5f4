"""Turns a RunPod job input into the gateway call that serves it.

Two input shapes are accepted, as in RunPod's worker-vllm and in the gateway's own job API:

- `{"prompt": str | list, "sampling_params"?: {...}, "stream"?: bool}` or the same with
  `"messages": [...]`: served by the gateway's OpenAI completions / chat route. The handler always
  streams from the gateway (so a cancelled job can drop its connection), and yields either one
  chunk per token event (`stream: true`) or one chunk with the whole text (the default).
- `{"openai_route": "/v1/chat/completions" | "/v1/completions" | "/v1/models",
  "openai_input": {...}}`: forwarded unchanged; `openai_input.stream` decides streaming.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

OPENAI_ROUTES: dict[str, str] = {
    "/v1/chat/completions": "POST",
    "/v1/completions": "POST",
    "/v1/models": "GET",
}
# Keys the handler sets itself in a text job's request body; a sampling parameter may not override
# them, or the handler would misread the answer.
RESERVED_BODY_KEYS = frozenset({"prompt", "messages", "stream", "stream_options"})
# A text job yields one text: what would answer with several choices or with tool calls needs the
# openai_route input, which returns the gateway's OpenAI objects unchanged.
OPENAI_ROUTE_ONLY_KEYS = frozenset({"tools", "tool_choice", "functions", "function_call"})


class JobInputError(ValueError):
    """The job input cannot be served; the message names the offending field."""


@dataclass(frozen=True)
class GatewayCall:
    method: Literal["GET", "POST"]
    route: str
    body: dict[str, Any] | None
    # The gateway answers with server-sent events rather than one JSON document.
    sse: bool
    # "openai": yield the gateway's objects unchanged; "text": yield {"text", ...} chunks.
    output: Literal["openai", "text"]
    # For text jobs: one chunk per event (True) or a single aggregated chunk (False).
    per_event: bool


def parse_job_input(job_input: Any) -> GatewayCall:
    if not isinstance(job_input, dict):
        raise JobInputError(f"input must be a JSON object, got {type(job_input).__name__}")
    if "openai_route" in job_input:
        return _openai_call(job_input)
    return _text_call(job_input)


def _openai_call(job_input: dict[str, Any]) -> GatewayCall:
    route = job_input["openai_route"]
    if route not in OPENAI_ROUTES:
        raise JobInputError(
            f"openai_route must be one of {', '.join(OPENAI_ROUTES)}, got {route!r}"
        )
    method = OPENAI_ROUTES[route]
    body = job_input.get("openai_input")
    if method == "GET":
        return GatewayCall("GET", route, None, sse=False, output="openai", per_event=True)
    if not isinstance(body, dict):
        raise JobInputError(f"openai_input must be a JSON object for {route}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise JobInputError("openai_input.stream must be true or false")
    return GatewayCall("POST", route, body, sse=stream, output="openai", per_event=True)


def _text_call(job_input: dict[str, Any]) -> GatewayCall:
    has_prompt = "prompt" in job_input
    has_messages = "messages" in job_input
    if has_prompt == has_messages:
        raise JobInputError(
            "input needs exactly one of prompt, messages or openai_route"
            if not has_prompt
            else "input has both prompt and messages; send one"
        )
    if has_prompt:
        prompt = job_input["prompt"]
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, str) and not prompt):
            raise JobInputError("prompt must be a non-empty string or a list")
        route, body = "/v1/completions", {"prompt": prompt}
    else:
        messages = job_input["messages"]
        if not isinstance(messages, list) or not messages:
            raise JobInputError("messages must be a non-empty list of {role, content} objects")
        route, body = "/v1/chat/completions", {"messages": messages}

    params = job_input.get("sampling_params", {})
    if not isinstance(params, dict):
        raise JobInputError("sampling_params must be a JSON object")
    reserved = sorted(RESERVED_BODY_KEYS & params.keys())
    if reserved:
        raise JobInputError(f"sampling_params.{reserved[0]} is not a sampling parameter")
    _refuse_several_outputs(params)
    stream = job_input.get("stream", False)
    if not isinstance(stream, bool):
        raise JobInputError("stream must be true or false")

    # vLLM's sampling parameter names are the OpenAI routes' names (plus top_k, min_p,
    # repetition_penalty, ... which the gateway accepts as extensions): they pass unchanged.
    body.update(params)
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    return GatewayCall("POST", route, body, sse=True, output="text", per_event=stream)


def _refuse_several_outputs(params: dict[str, Any]) -> None:
    route_only = sorted(OPENAI_ROUTE_ONLY_KEYS & params.keys())
    if route_only:
        raise JobInputError(
            f"sampling_params.{route_only[0]} needs the openai_route input "
            "(a text job has no tool calls)"
        )
    for key in ("n", "best_of"):
        value = params.get(key)
        if value is not None and value != 1:
            raise JobInputError(
                f"sampling_params.{key} > 1 needs the openai_route input "
                "(a text job yields one text)"
            )
