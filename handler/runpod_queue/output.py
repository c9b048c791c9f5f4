"""Shapes the gateway's OpenAI stream events into the chunks a RunPod job yields.

A text job yields `{"text": str, "finish_reason": str | None}` chunks; the last one also carries
`usage` (`prompt_tokens`, `completion_tokens`, `total_tokens`) as the gateway reports it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any


def error_message(payload: Any) -> str | None:
    """The error text of a gateway answer or stream event, None when it is not an error.

    The gateway writes `{"error": "...", "error_type": "..."}`; OpenAI-style streams may nest it
    as `{"error": {"message": ...}}`.
    """
    if not isinstance(payload, dict) or "error" not in payload:
        return None
    error = payload["error"]
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _delta(event: dict[str, Any]) -> tuple[str, str | None]:
    choices = event.get("choices") or []
    if not choices:
        return "", None
    choice = choices[0]
    text = choice.get("text")
    if text is None:  # chat chunks carry the text in delta.content
        text = (choice.get("delta") or {}).get("content")
    return text or "", choice.get("finish_reason")


async def text_chunks(
    events: AsyncIterator[dict[str, Any]], per_event: bool
) -> AsyncIterator[dict[str, Any]]:
    """Yield text chunks from OpenAI completion/chat stream events.

    An error event ends the job with `{"error": ...}`.
    """
    parts: list[str] = []
    finish: str | None = None
    usage: dict[str, Any] | None = None
    held: dict[str, Any] | None = None  # the finishing chunk, waiting for the usage event
    async for event in events:
        message = error_message(event)
        if message is not None:
            yield {"error": message}
            return
        text, finish_reason = _delta(event)
        finish = finish_reason or finish
        usage = event.get("usage") or usage
        if per_event and (text or finish_reason):
            if held is not None:
                yield held
                held = None
            chunk = {"text": text, "finish_reason": finish_reason}
            if finish_reason:
                held = chunk
            else:
                yield chunk
        parts.append(text)
    if per_event:
        last = held if held is not None else {"text": "", "finish_reason": finish}
        if usage is not None:
            last["usage"] = usage
        if held is not None or usage is not None:
            yield last
        return
    chunk = {"text": "".join(parts), "finish_reason": finish}
    if usage is not None:
        chunk["usage"] = usage
    yield chunk
