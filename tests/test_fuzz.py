"""Issue 13, item 7: property-based fuzzing (hypothesis) of everything that reads user files or
dicts: QuantConfig.from_dict, Manifest.from_dict and load_calibration (+ Calibration.apply). Whatever
the input, the outcome is a valid object or a ModiffExportError subclass with a one-line message,
never a TypeError/KeyError/AttributeError/IndexError/ValueError from deep inside.

The suite runs derandomized (the same examples every run: no flaky CI) with ~150 examples per
property; FUZZ_EXAMPLES=5000 FUZZ_RANDOM=1 explores further.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
from conftest import build_tiny_unet, tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modiff_export.calibration.file import load_calibration, write_calibration
from modiff_export.calibration.observe import calibrate
from modiff_export.config import QuantConfig
from modiff_export.errors import ModiffExportError
from modiff_export.export.trace import export_model
from modiff_export.manifest import Manifest
from modiff_export.quant.quantization import quantize
from modiff_export.sampling import Trajectories

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 150)), deadline=None, database=None,
                derandomize=not os.environ.get("FUZZ_RANDOM"), suppress_health_check=[HealthCheck.too_slow])
STATIC = QuantConfig(act_bits=4, scale_mode="static")

scalars = (st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=6)
           | st.sampled_from(["batch", "float32", "float16", "modiff", "conv", "a_hat", "sha256:"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=8)


def expect_clean(fn, *args):
    """fn(*args) returns, or raises a ModiffExportError with a one-line message."""
    try:
        return fn(*args)
    except ModiffExportError as e:
        assert "\n" not in str(e) and str(e).strip(), repr(e)
        return None


# -- mutations of a valid JSON document ------------------------------------------------------------------
RETYPE = [lambda v: str(v), lambda v: [v], lambda v: {"v": v}, lambda v: None, lambda v: True, lambda v: -1,
          lambda v: 1.5, lambda v: float("nan"), lambda v: "", lambda v: [], lambda v: {}]


def mutate(doc, data) -> None:
    """One random edit somewhere in `doc` (in place): delete a key/element, replace a value with any
    JSON value, change its type, or drop/duplicate a list element."""
    parent, key = None, None
    node = doc
    while isinstance(node, (dict, list)) and node and (parent is None or data.draw(st.integers(0, 3)) > 0):
        keys = sorted(node) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, data.draw(st.sampled_from(keys))
        node = node[key]
    if parent is None:
        return
    op = data.draw(st.sampled_from(["delete", "replace", "retype", "list"]))
    if op == "delete":
        del parent[key]
    elif op == "replace":
        parent[key] = data.draw(json_values)
    elif op == "retype":
        parent[key] = data.draw(st.sampled_from(RETYPE))(node)
    elif isinstance(parent, list):
        parent.append(copy.deepcopy(node)) if data.draw(st.booleans()) else parent.pop()
    elif isinstance(node, list) and node:
        node.pop(data.draw(st.integers(0, len(node) - 1)))


def mutated(valid: dict, data) -> dict:
    doc = copy.deepcopy(valid)
    for _ in range(data.draw(st.integers(1, 3))):
        mutate(doc, data)
    return doc


# -- fixtures: a real static multi-bucket export and its calibration file -------------------------------
@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fuzz")
    model = tiny_model(build_tiny_unet(0))
    cal = calibrate(model.copy(), STATIC, Trajectories("ddim", 3, 1, 1, seed=1000), method="absmax", buckets=2,
                    progress=False)
    write_calibration(root / "cal.json", cal)
    loaded = load_calibration(root / "cal.json", model.content_hash, STATIC)
    manifest = export_model(model.copy(), STATIC, root / "g", scales=loaded.scale_table, weights=loaded.weights,
                            progress=False)
    assert manifest.scales is not None and manifest.step_extra_inputs  # scale table + delta_scales input
    return {"root": root, "manifest": manifest.to_dict(), "cal": cal, "hash": model.content_hash,
            "unet": quantize(build_tiny_unet(0), STATIC)}


# -- QuantConfig ---------------------------------------------------------------------------------------------
FIELDS = ["mode", "weight_bits", "act_bits", "scale_mode", "granularity", "error_compensation",
          "keyframe_interval", "skip_layers", "int8_layers", "weight_block_size"]
GOOD = {"mode": st.sampled_from(["fp", "ptq", "modiff"]), "weight_bits": st.integers(1, 9),
        "act_bits": st.integers(1, 9), "scale_mode": st.sampled_from(["dynamic", "static"]),
        "granularity": st.sampled_from(["tensor", "sample"]), "error_compensation": st.booleans(),
        "keyframe_interval": st.none() | st.integers(-1, 5), "skip_layers": st.lists(st.text(max_size=5), max_size=3),
        "int8_layers": st.lists(st.text(max_size=5), max_size=3),
        "weight_block_size": st.none() | st.integers(-2, 130)}
config_dicts = st.fixed_dictionaries({}, optional={k: GOOD[k] | json_values for k in FIELDS}) | st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=6), json_values, max_size=5)


@FUZZ
@given(d=config_dicts | json_values)
def test_quant_config_from_dict(d):
    config = expect_clean(QuantConfig.from_dict, d)
    if config is not None:
        assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# -- Manifest --------------------------------------------------------------------------------------------------
def test_the_valid_manifest_round_trips(artifacts):
    m = Manifest.from_dict(artifacts["manifest"])
    assert Manifest.from_dict(m.to_dict()) == m


@FUZZ
@given(data=st.data())
def test_manifest_from_mutated_dict(artifacts, data):
    d = mutated(artifacts["manifest"], data)
    m = expect_clean(Manifest.from_dict, d)
    if m is not None:  # accepted: then it is usable as a manifest
        assert Manifest.from_dict(m.to_dict()) == m
        for role in m.roles:
            m.graph_inputs(role), m.graph_outputs(role)
        assert m.cache_bytes_per_sample >= 0
        for t in (0.0, 499.0, 999.0):
            m.delta_scale_row(t)


# -- calibration files -----------------------------------------------------------------------------------------
def _load_and_apply(path: Path, model_hash: str, unet) -> None:
    cal = load_calibration(path, model_hash, STATIC)
    assert cal.scale_table.n_buckets >= 1
    cal.apply(copy.deepcopy(unet))


@FUZZ
@given(data=st.data())
def test_calibration_from_mutated_file(artifacts, data):
    path = artifacts["root"] / "fuzzed.json"
    path.write_text(json.dumps(mutated(artifacts["cal"], data)))
    expect_clean(_load_and_apply, path, artifacts["hash"], artifacts["unet"])


@FUZZ
@given(cut=st.floats(0, 1, exclude_max=True))
def test_truncated_calibration_file(artifacts, cut):
    text = json.dumps(artifacts["cal"], indent=1)
    path = artifacts["root"] / "truncated.json"
    path.write_text(text[:int(len(text) * cut)])
    with pytest.raises(ModiffExportError):
        load_calibration(path, artifacts["hash"], STATIC)
