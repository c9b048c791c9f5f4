"""HTTP client of the local gateway, as the RunPod handler uses it.

One aiohttp session per process, opened lazily inside the SDK's event loop. Readiness is polled by
one shared task, so a hundred jobs that arrive during a cold start cost one `/ping` every
POLL_INTERVAL_S, not a hundred.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from handler.runpod_queue.config import HandlerConfig
from handler.runpod_queue.jobs import GatewayCall
from handler.runpod_queue.output import error_message

POLL_INTERVAL_S = 0.05
PING_TIMEOUT_S = 2.0


class GatewayError(Exception):
    """The gateway refused or failed a request, or never became ready."""


class GatewayClient:
    def __init__(
        self, config: HandlerConfig, child_exit: Callable[[], int | None] = lambda: None
    ) -> None:
        self._config = config
        # Returns the exit status of the gateway this handler started, None while it runs.
        self._child_exit = child_exit
        self._session: aiohttp.ClientSession | None = None
        self._ready = False
        self._ready_task: asyncio.Task[None] | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {}
            if self._config.api_key:
                headers["Authorization"] = f"Bearer {self._config.api_key}"
            self._session = aiohttp.ClientSession(
                base_url=self._config.gateway_url + "/",
                headers=headers,
                # Generation may take as long as the job's execution timeout; RunPod enforces it.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                connector=aiohttp.TCPConnector(limit=self._config.concurrency + 8),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def wait_ready(self) -> None:
        """Return once `/ping` answers 200; raise GatewayError on 503 or past the time limit."""
        if self._ready:
            return
        if self._ready_task is None or self._ready_task.done():
            self._ready_task = asyncio.create_task(self._poll_ready())
        # shield: one job being cancelled must not stop the poll the others wait on.
        await asyncio.shield(self._ready_task)

    async def _poll_ready(self) -> None:
        deadline = time.monotonic() + self._config.ready_timeout_s
        ping_timeout = aiohttp.ClientTimeout(total=PING_TIMEOUT_S)
        while True:
            status = None
            try:
                async with self._http().get("ping", timeout=ping_timeout) as resp:
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError):
                pass  # not listening yet: the gateway process is still starting
            if status == 200:
                self._ready = True
                return
            if status not in (None, 204):
                reason = await self._reason()
                raise GatewayError(f"gateway is not serving (GET /ping {status}): {reason}")
            code = self._child_exit()
            if code is not None:
                raise GatewayError(f"the gateway process exited with status {code} while starting")
            if time.monotonic() > deadline:
                raise GatewayError(
                    f"gateway not ready after {self._config.ready_timeout_s:g} s "
                    "(THAW_RUNPOD_READY_TIMEOUT)"
                )
            await asyncio.sleep(POLL_INTERVAL_S)

    async def _reason(self) -> str:
        """Why start-up failed, from GET /ready (best effort)."""
        try:
            async with self._http().get("ready", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                body = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return "no reason given"
        if isinstance(body, dict):
            return str(body.get("reason") or body.get("error") or body)
        return str(body)

    async def fetch_json(self, call: GatewayCall) -> Any:
        """One request answered with one JSON document."""
        try:
            async with self._request(call) as resp:
                payload = _json_or_text(await resp.text())
                if resp.status != 200:
                    raise GatewayError(_status_message(call, resp.status, payload))
                return payload
        except (TimeoutError, aiohttp.ClientError) as err:
            raise GatewayError(f"{call.method} {call.route} failed: {err!r}") from err

    async def stream_events(self, call: GatewayCall) -> AsyncIterator[dict[str, Any]]:
        """The JSON events of a server-sent-event answer, up to `data: [DONE]` or the end."""
        try:
            async with self._request(call) as resp:
                if resp.status != 200:
                    payload = _json_or_text(await resp.text())
                    raise GatewayError(_status_message(call, resp.status, payload))
                finished = False
                try:
                    async for data in _sse_data(resp.content):
                        if data == "[DONE]":
                            break
                        event = _json_or_text(data)
                        yield event if isinstance(event, dict) else {"error": f"bad event {data!r}"}
                    finished = True
                finally:
                    if not finished:
                        # Cancelled or abandoned mid-stream: drop the connection so the gateway
                        # sees the client go away and cancels the request in the worker.
                        resp.close()
        except (TimeoutError, aiohttp.ClientError) as err:
            raise GatewayError(f"{call.method} {call.route} failed: {err!r}") from err

    def _request(self, call: GatewayCall) -> Any:
        return self._http().request(call.method, call.route.lstrip("/"), json=call.body)


async def _sse_data(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The data field of each server-sent event (multi-line data joined with newlines)."""
    lines: list[str] = []
    async for raw in content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
        elif line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
        # Other fields (event:, id:, retry:) and comments (":") carry nothing the job needs.
    if lines:
        yield "\n".join(lines)


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _status_message(call: GatewayCall, status: int, payload: Any) -> str:
    detail = error_message(payload) or (str(payload)[:500] if payload else "no body")
    return f"gateway answered {status} to {call.method} {call.route}: {detail}"
