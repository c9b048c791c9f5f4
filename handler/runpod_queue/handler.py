"""RunPod queue-endpoint handler: each job is forwarded to the local thaw gateway.

Container command for a queue endpoint:  python -m handler.runpod_queue
It starts the gateway itself when none listens at THAW_GATEWAY_URL, then hands over to the runpod
SDK, which takes up to THAW_RUNPOD_CONCURRENCY jobs at once; the gateway batches them
continuously. Jobs taken while the model is still loading wait for `/ping` to answer 200.

Local checks without RunPod (the SDK's own modes):
  python -m handler.runpod_queue --test_input '{"input": {"prompt": "Hello"}}'
  python -m handler.runpod_queue --rp_serve_api --rp_api_port 8000
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from handler.runpod_queue.config import ConfigError, HandlerConfig
from handler.runpod_queue.gateway_client import GatewayClient, GatewayError
from handler.runpod_queue.jobs import GatewayCall, JobInputError, parse_job_input
from handler.runpod_queue.output import error_message, text_chunks
from handler.runpod_queue.spawn import ensure_gateway

JobHandler = Callable[[dict[str, Any]], AsyncIterator[Any]]


class QueueHandler:
    """The job function given to the SDK (`handle`), bound to one gateway client."""

    def __init__(self, gateway: GatewayClient) -> None:
        self._gateway = gateway

    async def handle(self, job: dict[str, Any]) -> AsyncIterator[Any]:
        """Yield the job's output chunks; a failure yields `{"error": ...}` as the last chunk.

        asyncio.CancelledError (the job was cancelled or timed out) propagates: leaving the
        stream closes the gateway connection, which cancels the request in the worker.
        """
        try:
            call = parse_job_input(job.get("input"))
            await self._gateway.wait_ready()
            async for chunk in self._forward(call):
                yield chunk
        except (JobInputError, GatewayError) as err:
            yield {"error": str(err)}

    async def _forward(self, call: GatewayCall) -> AsyncIterator[Any]:
        if not call.sse:
            answer = await self._gateway.fetch_json(call)
            message = error_message(answer)
            yield answer if message is None else {"error": message}
            return
        events = self._gateway.stream_events(call)
        if call.output == "text":
            events = text_chunks(events, call.per_event)
        async for event in events:
            message = error_message(event)
            yield event if message is None else {"error": message}
            if message is not None:
                return


def aggregate(
    handle: JobHandler, after_job: Callable[[], Awaitable[None]] | None = None
) -> Callable[[dict[str, Any]], Awaitable[Any]]:
    """The handler as a plain coroutine that returns the aggregated stream.

    The SDK's `--test_input` mode awaits the handler instead of iterating it (runpod 1.12's
    rp_local uses run_job), so a generator would never run there; this gives it the same
    output that `return_aggregate_stream` gives /runsync. `after_job` runs once the job is done
    (the one-job test mode closes the HTTP session there, before the SDK exits the process).
    """

    async def handle_aggregated(job: dict[str, Any]) -> Any:
        chunks: list[Any] = []
        try:
            async for chunk in handle(job):
                message = error_message(chunk)
                if message is not None:
                    return {"error": message}
                chunks.append(chunk)
            return chunks
        finally:
            if after_job is not None:
                await after_job()

    return handle_aggregated


def sdk_iterates_generators(argv: list[str], env: Mapping[str, str]) -> bool:
    """Whether the SDK mode chosen by argv/env drives a generator handler chunk by chunk.

    The queue worker and `--rp_serve_api` do; `--test_input`, test_input.json and the realtime
    port mode await the handler, so there it must be a coroutine.
    """
    if "--rp_serve_api" in argv:
        return True
    if env.get("RUNPOD_REALTIME_PORT", "0") not in ("", "0"):
        return False
    test_input = any(arg.startswith("--test_input") for arg in argv)
    return bool(env.get("RUNPOD_WEBHOOK_GET_JOB")) and not test_input


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = HandlerConfig.from_env()
    except ConfigError as err:
        print(f"runpod_queue: {err}", file=sys.stderr)
        return 2
    # The SDK is imported after the gateway is spawned: its import alone takes about a second.
    process = ensure_gateway(config)
    gateway = GatewayClient(config, child_exit=process.exit_code if process else lambda: None)
    handle = QueueHandler(gateway).handle

    import runpod

    if sdk_iterates_generators(sys.argv, os.environ):
        job_function = handle
    else:
        one_job = "RUNPOD_REALTIME_PORT" not in os.environ
        job_function = aggregate(handle, gateway.close if one_job else None)
    runpod.serverless.start(
        {
            "handler": job_function,
            "return_aggregate_stream": True,
            "concurrency_modifier": lambda _current: config.concurrency,
        }
    )
    return 0
