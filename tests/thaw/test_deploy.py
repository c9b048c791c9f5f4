"""`thaw deploy`: dry-run payloads against template.yaml, and real calls to a fake RunPod API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.fake_runpod_api import FakeRunPodApi
from thaw.cli import main

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRunPodApi]:
    api = FakeRunPodApi().start()
    monkeypatch.setenv("RUNPOD_API_KEY", api.api_key)
    yield api
    api.stop()


def raw_template() -> dict[str, Any]:
    return yaml.safe_load(TEMPLATE.read_text())


def write_template(tmp_path: Path, **changes: Any) -> Path:
    data = raw_template()
    for key, value in changes.items():
        if value is _DELETE:
            data.pop(key)
        else:
            data[key] = value
    path = tmp_path / "template.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


_DELETE = object()


def dry_run(capsys: pytest.CaptureFixture[str], path: Path, *extra: str) -> list[dict[str, Any]]:
    assert main(["deploy", str(path), "--dry-run", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def env_dict(entries: list[dict[str, str]]) -> dict[str, str]:
    return {entry["key"]: entry["value"] for entry in entries}


def test_dry_run_matches_template_yaml_field_by_field(capsys: pytest.CaptureFixture[str]) -> None:
    raw = raw_template()
    calls = dry_run(capsys, TEMPLATE, "--api-url", "https://api.example.test")
    assert [call["url"] for call in calls] == ["https://api.example.test/graphql"] * 3
    assert all(call["method"] == "POST" for call in calls)
    assert "myself" in calls[0]["body"]["query"]

    saved_template = calls[1]["body"]["variables"]["input"]
    assert "saveTemplate(input: $input)" in calls[1]["body"]["query"]
    assert saved_template["name"] == raw["name"]
    assert saved_template["imageName"] == raw["image"]
    assert saved_template["containerDiskInGb"] == raw["container_disk_gb"]
    assert saved_template["volumeInGb"] == raw["volume"]["size_gb"]
    assert saved_template["volumeMountPath"] == raw["volume"]["mount_path"]
    assert saved_template["isServerless"] is True
    assert "id" not in saved_template
    env = env_dict(saved_template["env"])
    assert env == {
        **{key: str(value) for key, value in raw["env"].items()},
        "THAW_SNAPSHOT": raw["snapshot"],
        "PORT": str(raw["port"]),
        "PORT_HEALTH": str(raw["port"]),
        # RunPod's proxy authenticates: the gateway's explicit opt-out from its own key.
        "THAW_ALLOW_UNAUTHENTICATED": "true",
    }
    # Load balancer: the image's default command (the gateway) serving HTTP on the port.
    assert raw["endpoint_type"] == "load_balancer"
    assert saved_template["dockerArgs"] == ""
    assert saved_template["ports"] == f"{raw['port']}/http"

    endpoint = calls[2]["body"]["variables"]["input"]
    assert "saveEndpoint(input: $input)" in calls[2]["body"]["query"]
    assert endpoint["name"] == raw["name"]
    assert endpoint["type"] == "LB"
    assert endpoint["gpuIds"] == ",".join(raw["gpu_types"])
    assert endpoint["gpuCount"] == raw["gpu_count"]
    assert endpoint["workersMin"] == raw["workers_min"] == 0
    assert endpoint["workersMax"] == raw["workers_max"]
    assert endpoint["idleTimeout"] == raw["idle_timeout_s"]
    assert endpoint["executionTimeoutMs"] == raw["execution_timeout_s"] * 1000
    assert endpoint["flashBootType"] == ("FLASHBOOT" if raw["flashboot"] else "OFF")
    assert endpoint["scalerType"] == raw["scaler"]["type"]
    assert endpoint["scalerValue"] == raw["scaler"]["value"]
    assert endpoint["networkVolumeId"] == raw["volume"]["network_volume_id"]
    assert endpoint["locations"] == ",".join(raw["locations"])
    assert endpoint.get("allowedCudaVersions", "") == ",".join(raw["cuda_versions"])
    assert endpoint["templateId"] == "<id returned by saveTemplate>"


def test_queue_endpoint_runs_the_runpod_handler(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_template(
        tmp_path, endpoint_type="queue", snapshot="s3://models/thaw/smollm2", flashboot=False
    )
    calls = dry_run(capsys, path)
    saved_template = calls[1]["body"]["variables"]["input"]
    assert saved_template["dockerArgs"] == "python -m handler.runpod_queue"
    assert saved_template["ports"] == ""
    env = env_dict(saved_template["env"])
    assert env["THAW_SNAPSHOT"] == "s3://models/thaw/smollm2"
    assert "PORT" not in env
    # Only the handler beside it calls the gateway: loopback, no key and no opt-out needed.
    assert env["HOST"] == "127.0.0.1"
    assert "THAW_ALLOW_UNAUTHENTICATED" not in env
    endpoint = calls[2]["body"]["variables"]["input"]
    assert endpoint["type"] == "QB"
    assert endpoint["flashBootType"] == "OFF"


def test_auth_defaults_yield_to_the_users_env(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def env_of(**changes: Any) -> dict[str, str]:
        calls = dry_run(capsys, write_template(tmp_path, **changes))
        return env_dict(calls[1]["body"]["variables"]["input"]["env"])

    keyed = env_of(env={"THAW_API_KEY": "{{ RUNPOD_SECRET_thaw_key }}"})
    assert keyed["THAW_API_KEY"] == "{{ RUNPOD_SECRET_thaw_key }}"
    assert "THAW_ALLOW_UNAUTHENTICATED" not in keyed
    refused = env_of(env={"THAW_ALLOW_UNAUTHENTICATED": "false"})
    assert refused["THAW_ALLOW_UNAUTHENTICATED"] == "false"
    queue = env_of(endpoint_type="queue", env={"HOST": "0.0.0.0", "THAW_API_KEY": "k"})
    assert queue["HOST"] == "0.0.0.0"


def test_deploy_creates_then_updates_in_place(
    fake_api: FakeRunPodApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = dry_run(capsys, TEMPLATE)
    assert main(["deploy", str(TEMPLATE), "--api-url", fake_api.url]) == 0
    out = capsys.readouterr().out
    assert len(fake_api.templates) == len(fake_api.endpoints) == 1
    template_id = next(iter(fake_api.templates))
    endpoint_id = next(iter(fake_api.endpoints))
    assert f"template {template_id}, load-balancer endpoint {endpoint_id}" in out

    calls = fake_api.calls
    assert [call.path for call in calls] == ["/graphql"] * 3
    assert all(call.authorization == f"Bearer {fake_api.api_key}" for call in calls)
    # What was sent is exactly what --dry-run printed, with the real template id filled in.
    assert [call.body["query"] for call in calls] == [e["body"]["query"] for e in expected]
    assert calls[1].variables_input == expected[1]["body"]["variables"]["input"]
    assert calls[2].variables_input == {
        **expected[2]["body"]["variables"]["input"],
        "templateId": template_id,
    }

    # Second deploy of a changed template: same resources, updated by id.
    changed = write_template(tmp_path, workers_max=7, image="ghcr.io/your-org/thaw:0.2.0")
    fake_api.calls.clear()
    assert main(["deploy", str(changed), "--api-url", fake_api.url]) == 0
    assert list(fake_api.templates) == [template_id]
    assert list(fake_api.endpoints) == [endpoint_id]
    saved_template, saved_endpoint = (call.variables_input for call in fake_api.calls[1:])
    assert saved_template["id"] == template_id
    assert saved_template["imageName"] == "ghcr.io/your-org/thaw:0.2.0"
    assert saved_endpoint["id"] == endpoint_id
    assert saved_endpoint["templateId"] == template_id
    assert saved_endpoint["workersMax"] == 7


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "", "name: must be 1-191 characters"),
        ("image", "Not An Image", "image: must be an image reference"),
        ("image", _DELETE, "image: is required"),
        ("endpoint_type", "serverful", "endpoint_type: must be one of queue, load_balancer"),
        ("gpu_types", ["RTX 4090"], "gpu_types: 'RTX 4090' is not one of RunPod GPU pool ids"),
        ("gpu_types", [], "gpu_types: must be a list"),
        ("workers_min", -1, "workers_min: must be an integer from 0"),
        ("workers_min", 5, "workers_min: 5 is above workers_max"),
        ("workers_max", "three", "workers_max: must be an integer"),
        ("idle_timeout_s", 0, "idle_timeout_s: must be an integer from 1 to 3600"),
        ("flashboot", "yes please", "flashboot: must be true or false"),
        ("execution_timeout_s", 1.5, "execution_timeout_s: must be an integer"),
        ("snapshot", "relative/path", "snapshot: must be an absolute path"),
        ("container_disk_gb", 0, "container_disk_gb: must be an integer from 1"),
        ("volume", {"size_gb": -5}, "volume.size_gb: must be an integer from 0"),
        ("volume", {"mount": "/x"}, "volume.mount: is not a template field"),
        ("scaler", {"type": "CPU_LOAD"}, "scaler.type: must be one of QUEUE_DELAY"),
        ("port", 70000, "port: must be an integer from 1 to 65535"),
        ("env", {"THAW_SNAPSHOT": "/x"}, "env.THAW_SNAPSHOT: is set by the template itself"),
        ("env", {"BAD-NAME": "x"}, "env.BAD-NAME: is not a valid environment variable name"),
        ("env", {"DEBUG": ["x"]}, "env.DEBUG: must be a string or a number"),
        ("workers", 3, "workers: is not a template field"),
    ],
)
def test_invalid_template_is_refused_naming_the_field(
    fake_api: FakeRunPodApi,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    field: str,
    value: Any,
    message: str,
) -> None:
    path = write_template(tmp_path, **{field: value})
    for dry in ([], ["--dry-run"]):
        assert main(["deploy", str(path), "--api-url", fake_api.url, *dry]) == 2
        err = capsys.readouterr().err
        assert message in err, err
    assert fake_api.calls == []


def test_unreadable_or_malformed_template(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["deploy", str(tmp_path / "missing.yaml"), "--dry-run"]) == 2
    assert "template: cannot read" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    assert main(["deploy", str(broken), "--dry-run"]) == 2
    assert "template: not valid YAML" in capsys.readouterr().err
    broken.write_text("- just\n- a list\n")
    assert main(["deploy", str(broken), "--dry-run"]) == 2
    assert "template: must be a mapping" in capsys.readouterr().err


def test_missing_api_key_sends_nothing(
    fake_api: FakeRunPodApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("RUNPOD_API_KEY")
    assert main(["deploy", str(TEMPLATE), "--api-url", fake_api.url]) == 2
    assert "set RUNPOD_API_KEY" in capsys.readouterr().err
    assert fake_api.calls == []


def test_refused_api_key(
    fake_api: FakeRunPodApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", "wrong")
    assert main(["deploy", str(TEMPLATE), "--api-url", fake_api.url]) == 1
    assert "refused RUNPOD_API_KEY" in capsys.readouterr().err
    assert len(fake_api.calls) == 1


def test_api_error_is_reported(fake_api: FakeRunPodApi, capsys: pytest.CaptureFixture[str]) -> None:
    fake_api.fail_mutation = "saveEndpoint"
    assert main(["deploy", str(TEMPLATE), "--api-url", fake_api.url]) == 1
    assert "saveEndpoint: GPU pool not available" in capsys.readouterr().err


def test_ambiguous_name_is_refused(
    fake_api: FakeRunPodApi, capsys: pytest.CaptureFixture[str]
) -> None:
    name = raw_template()["name"]
    fake_api.endpoints = {"a": {"id": "a", "name": name}, "b": {"id": "b", "name": name}}
    assert main(["deploy", str(TEMPLATE), "--api-url", fake_api.url]) == 1
    assert f"2 RunPod resources are named '{name}'" in capsys.readouterr().err


def test_unreachable_api(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", "k")
    assert main(["deploy", str(TEMPLATE), "--api-url", "http://127.0.0.1:9"]) == 1
    assert "cannot reach the RunPod API at http://127.0.0.1:9" in capsys.readouterr().err
