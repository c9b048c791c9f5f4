"""The worker's side of docs/sampling_contract.json: SamplingParams has exactly the contract's
parameters with its defaults and bounds, and accepts or refuses each case as the file says. The
gateway checks the same file (rust_gateway/src/validation.rs tests)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from handler.engine.params import SamplingParams
from handler.protocol import PARAM_KEYS, sampling_params

CONTRACT = json.loads(
    (Path(__file__).resolve().parents[3] / "docs" / "sampling_contract.json").read_text()
)
VOCAB = 1000


def test_the_parameters_are_the_contracts_in_order():
    names = [p["name"] for p in CONTRACT["params"]]
    assert [f.name for f in fields(SamplingParams)] == names
    assert list(PARAM_KEYS) == names
    assert list(CONTRACT["base"]) == names


def test_defaults_match_the_contract():
    defaults = SamplingParams()
    for param in CONTRACT["params"]:
        if "default" in param:
            assert getattr(defaults, param["name"]) == param["default"], param["name"]


@pytest.mark.parametrize("param", [p for p in CONTRACT["params"] if "min" in p or "max" in p])
def test_bounds_are_enforced_at_the_edges(param):
    name = param["name"]
    step = 1 if param["type"].startswith("int") else 1e-6
    if "max" in param:
        SamplingParams(**{**CONTRACT["base"], name: param["max"]}).validate(VOCAB)
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{**CONTRACT["base"], name: param["max"] + step}).validate(VOCAB)
    if "min" in param:
        below = param["min"] if param.get("min_exclusive") else param["min"] - step
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{**CONTRACT["base"], name: below}).validate(VOCAB)


@pytest.mark.parametrize("case", CONTRACT["cases"], ids=lambda c: json.dumps(c["set"]))
def test_each_case_through_the_submit_frame(case):
    msg = {"t": "submit", "id": 1, "prompt": [1, 2], "params": {**CONTRACT["base"], **case["set"]}}
    _prompt, params = sampling_params(msg)
    if case["valid"]:
        params.validate(VOCAB)
    else:
        with pytest.raises(ValueError, match=case["field"]):
            params.validate(VOCAB)
