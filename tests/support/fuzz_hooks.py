"""schemathesis hooks for the fuzz suite (loaded through SCHEMATHESIS_HOOKS).

Every generated body loses its `webhook` fields, so that no fuzzed request can make the gateway
deliver anywhere: the suite must send traffic only to loopback even if the gateway's webhook
checks were broken. The webhook checks have their own suite (tests/gateway/test_ssrf.py).
"""

from __future__ import annotations

from typing import Any

import schemathesis


def without_webhooks(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_webhooks(v) for k, v in value.items() if k != "webhook"}
    if isinstance(value, list):
        return [without_webhooks(v) for v in value]
    return value


@schemathesis.hook
def map_body(context: Any, body: Any) -> Any:
    return without_webhooks(body)
