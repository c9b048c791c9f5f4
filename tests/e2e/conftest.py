"""One real gateway + worker on the default snapshot in bfloat16, shared by the structured
output, tool and schema-corpus suites: starting one costs seconds, and none of them changes
the server's state."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.serve_fixtures import Server, ensure_default_snapshot


@pytest.fixture(scope="session")
def bf16_server(gateway_binary: Path) -> Iterator[Server]:
    srv = Server(ensure_default_snapshot(), env={"THAW_DTYPE": "bfloat16"}).start()
    srv.wait_ready()
    yield srv
    assert srv.stop() == 0, srv.logs()


@pytest.fixture(scope="session")
def bf16_client(bf16_server: Server) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{bf16_server.base_url}/v1", api_key="unused", max_retries=0, timeout=300
    )
