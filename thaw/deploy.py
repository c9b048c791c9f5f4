"""`thaw deploy template.yaml`: create or update a RunPod serverless template and endpoint.

Talks to RunPod's GraphQL API (POST {api}/graphql), the API the runpod SDK itself uses: its
`saveTemplate` and `saveEndpoint` mutations create a resource, or update it when the input has an
`id`, and `saveEndpoint` is the call that sets the endpoint type (queue or load balancer) and the
execution timeout. Existing resources are found by name, so running it twice updates in place.
`--dry-run` prints the exact request bodies instead and needs no API key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import requests

from thaw.template import DeployTemplate, TemplateError, load_template

DEFAULT_API_URL = "https://api.runpod.io"
QUEUE_COMMAND = "python -m handler.runpod_queue"
# Stands for the id saveTemplate returns, in a dry run where nothing is created.
TEMPLATE_ID_PLACEHOLDER = "<id returned by saveTemplate>"

LIST_QUERY = "query thawDeployList { myself { podTemplates { id name } endpoints { id name } } }"
SAVE_TEMPLATE = (
    "mutation thawSaveTemplate($input: SaveTemplateInput!) "
    "{ saveTemplate(input: $input) { id name imageName } }"
)
SAVE_ENDPOINT = (
    "mutation thawSaveEndpoint($input: EndpointInput!) "
    "{ saveEndpoint(input: $input) { id name templateId type } }"
)


class DeployError(RuntimeError):
    """The RunPod API refused a call or could not be reached."""


def template_input(template: DeployTemplate, template_id: str | None) -> dict[str, Any]:
    queue = template.endpoint_type == "queue"
    payload: dict[str, Any] = {
        "name": template.name,
        "imageName": template.image,
        # Queue workers run the RunPod handler; load-balancer workers run the image's default
        # command, the gateway, which serves HTTP on PORT itself.
        "dockerArgs": QUEUE_COMMAND if queue else "",
        "containerDiskInGb": template.container_disk_gb,
        "volumeInGb": template.volume.size_gb,
        "volumeMountPath": template.volume.mount_path,
        "ports": "" if queue else f"{template.port}/http",
        "env": [{"key": key, "value": value} for key, value in template.worker_env.items()],
        "isServerless": True,
        "isPublic": False,
        "readme": "",
    }
    if template_id:
        payload["id"] = template_id
    return payload


def endpoint_input(
    template: DeployTemplate, template_id: str, endpoint_id: str | None
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "name": template.name,
        "templateId": template_id,
        "type": "QB" if template.endpoint_type == "queue" else "LB",
        "gpuIds": ",".join(template.gpu_types),
        "gpuCount": template.gpu_count,
        "workersMin": template.workers_min,
        "workersMax": template.workers_max,
        "idleTimeout": template.idle_timeout_s,
        "scalerType": template.scaler.type,
        "scalerValue": template.scaler.value,
        "executionTimeoutMs": template.execution_timeout_s * 1000,
        "flashBootType": "FLASHBOOT" if template.flashboot else "OFF",
        "networkVolumeId": template.volume.network_volume_id or "",
        "locations": ",".join(template.locations),
    }
    if template.cuda_versions:
        payload["allowedCudaVersions"] = ",".join(template.cuda_versions)
    if endpoint_id:
        payload["id"] = endpoint_id
    return payload


def graphql_body(query: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"query": query, "variables": {"input": payload} if payload is not None else {}}


@dataclass
class RunPodClient:
    api_url: str
    api_key: str
    timeout_s: float = 30.0

    def call(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = requests.post(
                f"{self.api_url.rstrip('/')}/graphql",
                json=body,
                headers={"Authorization": f"Bearer {self.api_key}"},
                timeout=self.timeout_s,
            )
        except requests.RequestException as err:
            raise DeployError(f"cannot reach the RunPod API at {self.api_url}: {err}") from None
        if response.status_code in (401, 403):
            raise DeployError("the RunPod API refused RUNPOD_API_KEY (HTTP 401/403)")
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise DeployError(f"the RunPod API answered {response.status_code} without JSON")
        errors = answer.get("errors") or []
        if errors or response.status_code != 200:
            messages = "; ".join(_message(error) for error in errors) or str(answer)[:300]
            raise DeployError(f"the RunPod API answered {response.status_code}: {messages}")
        return answer.get("data") or {}


def _message(error: Any) -> str:
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)


def _saved_id(data: dict[str, Any], mutation: str) -> str:
    saved = data.get(mutation)
    if not isinstance(saved, dict) or not saved.get("id"):
        raise DeployError(f"the RunPod API's answer to {mutation} has no id: {data}")
    return str(saved["id"])


def _id_by_name(items: list[dict[str, Any]] | None, name: str) -> str | None:
    matches = [item.get("id") for item in items or [] if item.get("name") == name]
    if len(matches) > 1:
        raise DeployError(f"{len(matches)} RunPod resources are named {name!r}; rename one")
    return matches[0] if matches else None


def deploy(template: DeployTemplate, client: RunPodClient) -> dict[str, str]:
    """Create or update the template, then the endpoint; return their ids."""
    mine = client.call(graphql_body(LIST_QUERY)).get("myself") or {}
    template_id = _id_by_name(mine.get("podTemplates"), template.name)
    endpoint_id = _id_by_name(mine.get("endpoints"), template.name)
    saved = client.call(graphql_body(SAVE_TEMPLATE, template_input(template, template_id)))
    template_id = _saved_id(saved, "saveTemplate")
    saved = client.call(
        graphql_body(SAVE_ENDPOINT, endpoint_input(template, template_id, endpoint_id))
    )
    return {"template_id": template_id, "endpoint_id": _saved_id(saved, "saveEndpoint")}


def dry_run_calls(template: DeployTemplate, api_url: str) -> list[dict[str, Any]]:
    url = f"{api_url.rstrip('/')}/graphql"
    return [
        {"method": "POST", "url": url, "body": graphql_body(LIST_QUERY)},
        {
            "method": "POST",
            "url": url,
            "body": graphql_body(SAVE_TEMPLATE, template_input(template, None)),
        },
        {
            "method": "POST",
            "url": url,
            "body": graphql_body(
                SAVE_ENDPOINT, endpoint_input(template, TEMPLATE_ID_PLACEHOLDER, None)
            ),
        },
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("template", help="deployment template, e.g. template.yaml")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the RunPod API requests as JSON instead of sending them",
    )
    parser.add_argument(
        "--api-url",
        default=os.environ.get("RUNPOD_API_BASE_URL", DEFAULT_API_URL),
        help=f"RunPod API base URL (default {DEFAULT_API_URL}; env RUNPOD_API_BASE_URL)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        template = load_template(args.template)
    except TemplateError as err:
        print(f"thaw deploy: invalid template {args.template}: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(dry_run_calls(template, args.api_url), indent=2))
        return 0
    api_key = os.environ.get("RUNPOD_API_KEY")
    if not api_key:
        print("thaw deploy: set RUNPOD_API_KEY (or use --dry-run)", file=sys.stderr)
        return 2
    try:
        ids = deploy(template, RunPodClient(args.api_url, api_key))
    except DeployError as err:
        print(f"thaw deploy: {err}", file=sys.stderr)
        return 1
    kind = "queue" if template.endpoint_type == "queue" else "load-balancer"
    print(f"template {ids['template_id']}, {kind} endpoint {ids['endpoint_id']}")
    if template.endpoint_type == "queue":
        print(f"jobs:  https://api.runpod.ai/v2/{ids['endpoint_id']}/run")
    else:
        print(f"HTTP:  https://{ids['endpoint_id']}.api.runpod.ai/v1/chat/completions")
    return 0
