"""QuantConfig: frozen, validated, serialisable (docs/design.md section 1, ablations through config)."""
from __future__ import annotations

import dataclasses

import pytest

from modiff_export.config import GRANULARITIES, MODES, SCALE_MODES, ConfigError, QuantConfig
from modiff_export.errors import ModiffExportError


def test_defaults_are_the_product_defaults():
    c = QuantConfig()
    assert (c.mode, c.weight_bits, c.act_bits) == ("modiff", 8, 8)
    assert c.scale_mode == "dynamic"
    assert c.granularity == "sample"  # batch-invariant is the product default (docs/design.md section 1)
    assert c.error_compensation is True
    assert c.keyframe_interval is None
    assert c.tag == "modiff-w8a8"
    assert QuantConfig(mode="fp").tag == "fp"
    assert QuantConfig(mode="ptq", act_bits=4).tag == "ptq-w8a4"


def test_frozen():
    c = QuantConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.act_bits = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.mode = "fp"
    assert hash(c) == hash(QuantConfig())


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("mode", "int8", [repr(m) for m in MODES]),
        ("mode", "MODIFF", [repr(m) for m in MODES]),
        ("scale_mode", "calibrated", [repr(m) for m in SCALE_MODES]),
        ("granularity", "channel", [repr(g) for g in GRANULARITIES]),
        ("weight_bits", 1, ["2..8"]),
        ("weight_bits", 9, ["2..8"]),
        ("act_bits", 16, ["2..8"]),
        ("act_bits", True, ["2..8"]),
        ("act_bits", 4.0, ["2..8"]),
        ("weight_bits", "8", ["2..8"]),
        ("keyframe_interval", 0, [">= 1"]),
        ("keyframe_interval", -3, [">= 1"]),
        ("keyframe_interval", True, [">= 1"]),
        ("error_compensation", 1, ["True or False"]),
        ("skip_layers", "conv_in", ["tuple"]),
        ("int8_layers", "conv_*", ["tuple"]),
        ("skip_layers", ("conv_in", 3), ["tuple"]),
    ],
)
def test_bad_values_raise_config_error_naming_field_and_allowed(field, value, allowed):
    with pytest.raises(ConfigError) as ei:
        QuantConfig(**{field: value})
    msg = str(ei.value)
    assert f"QuantConfig.{field}" in msg, msg
    for a in allowed:
        assert a in msg, msg
    # ConfigError is both a project error (CLI prints one line) and a ValueError.
    assert isinstance(ei.value, ModiffExportError) and isinstance(ei.value, ValueError)


def test_replace_is_validated_too():
    with pytest.raises(ConfigError, match="act_bits"):
        QuantConfig().replace(act_bits=1)
    assert QuantConfig().replace(act_bits=4).act_bits == 4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_all_bit_widths_in_range_accepted(bits):
    c = QuantConfig(weight_bits=bits, act_bits=bits)
    assert (c.weight_bits, c.act_bits) == (bits, bits)


def test_lists_of_patterns_are_normalised_to_tuples():
    c = QuantConfig(skip_layers=["conv_in", "conv_out"], int8_layers=["time_embedding.*"])
    assert c.skip_layers == ("conv_in", "conv_out")
    assert c.int8_layers == ("time_embedding.*",)
    hash(c)  # still hashable after normalisation


def test_to_dict_from_dict_round_trip():
    c = QuantConfig(mode="modiff", weight_bits=4, act_bits=3, scale_mode="static", granularity="tensor",
                    error_compensation=False, keyframe_interval=5,
                    skip_layers=("conv_in", "*.proj_out"), int8_layers=("time_embedding.*",))
    d = c.to_dict()
    assert d["skip_layers"] == ["conv_in", "*.proj_out"]  # JSON friendly
    assert set(d) == {f.name for f in dataclasses.fields(QuantConfig)}
    import json

    back = QuantConfig.from_dict(json.loads(json.dumps(d)))
    assert back == c
    assert QuantConfig.from_dict(QuantConfig().to_dict()) == QuantConfig()
    assert QuantConfig.from_dict({}) == QuantConfig()


def test_from_dict_rejects_unknown_fields():
    d = QuantConfig().to_dict()
    d["act_bitz"] = 4
    with pytest.raises(ConfigError) as ei:
        QuantConfig.from_dict(d)
    assert "act_bitz" in str(ei.value) and "act_bits" in str(ei.value)


def test_from_dict_validates_values():
    with pytest.raises(ConfigError, match="granularity"):
        QuantConfig.from_dict({"granularity": "batch"})


def test_bits_for_with_int8_layers():
    c = QuantConfig(weight_bits=4, act_bits=4, int8_layers=("conv_in", "time_embedding.*"))
    assert c.bits_for("conv_in") == (8, 8)
    assert c.bits_for("time_embedding.linear_1") == (8, 8)
    assert c.bits_for("time_embedding") == (4, 4)  # the pattern needs the dot
    assert c.bits_for("conv_out") == (4, 4)
    assert c.bits_for("down_blocks.0.resnets.0.conv1") == (4, 4)
    assert QuantConfig(weight_bits=3, act_bits=5).bits_for("anything") == (3, 5)


def test_skips_with_patterns():
    c = QuantConfig(skip_layers=("conv_in", "*.attentions.*.to_[qk]", "up_blocks.1.*"))
    assert c.skips("conv_in")
    assert not c.skips("conv_in_extra") and not c.skips("xconv_in")
    assert c.skips("down_blocks.1.attentions.0.to_q")
    assert c.skips("down_blocks.1.attentions.0.to_k")
    assert not c.skips("down_blocks.1.attentions.0.to_v")
    assert c.skips("up_blocks.1.resnets.0.conv1")
    assert not c.skips("up_blocks.0.resnets.0.conv1")
    assert not c.skips("CONV_IN")  # case-sensitive (fnmatchcase): layer names are exact
    assert not QuantConfig().skips("conv_in")
