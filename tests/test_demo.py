"""Fast checks of the demo's pieces: BOP/MAC counting against hand counts, and the report builder."""
from __future__ import annotations

import torch
import torch.nn as nn

from modiff_export.config import QuantConfig
from modiff_export.evaluation import cost
from modiff_export.quant.quantization import quantize


class Tiny(nn.Module):
    """conv 3->8 (3x3, pad 1, stride 2) on 8x8 -> [8, 4, 4] -> flatten 128 -> linear 128->10."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


CONV_MACS = 2 * 8 * 4 * 4 * 3 * 3 * 3  # batch 2: B * Cout * Hout * Wout * Cin * kh * kw = 6912
FC_MACS = 2 * 128 * 10                  # 2560


def test_macs_by_hand():
    macs = {l.name: l.macs for l in cost.count_macs(Tiny(), torch.zeros(2, 3, 8, 8))}
    assert macs == {"conv": CONV_MACS, "fc": FC_MACS}


def test_macs_through_modiff_wrappers_and_grouped_conv():
    m = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2))
    assert cost.count_macs(m, torch.zeros(1, 4, 5, 5))[0].macs == 4 * 5 * 5 * 2 * 9
    q = quantize(Tiny(), QuantConfig(mode="ptq"))
    assert {l.name: l.macs for l in cost.count_macs(q, torch.zeros(2, 3, 8, 8))} == {"conv": CONV_MACS, "fc": FC_MACS}


def test_bops_per_call_and_trajectory():
    macs = cost.count_macs(Tiny(), torch.zeros(2, 3, 8, 8))
    total = CONV_MACS + FC_MACS
    assert cost.bops_per_call(macs, QuantConfig(mode="fp")) == total * 32 * 32
    assert cost.bops_per_call(macs, QuantConfig(mode="ptq", weight_bits=8, act_bits=4)) == total * 8 * 4
    md = QuantConfig(mode="modiff", weight_bits=4, act_bits=3)
    prime, step = cost.bops_per_call(macs, md, "prime"), cost.bops_per_call(macs, md, "step")
    assert (prime, step) == (total * 4 * 32, total * 4 * 3)
    assert cost.bops_per_trajectory(macs, md, 25) == prime + 24 * step
    assert cost.bops_per_trajectory(macs, QuantConfig(mode="ptq"), 25) == 25 * total * 64
    # keyframes every 10 calls: calls 0, 10, 20 are prime
    assert cost.bops_per_trajectory(macs, md.replace(keyframe_interval=10), 25) == 3 * prime + 22 * step
    # per-layer overrides: fc skipped (32x32), conv at 8/8
    mixed = QuantConfig(mode="ptq", weight_bits=4, act_bits=4, skip_layers=("fc",), int8_layers=("conv",))
    assert cost.bops_per_call(macs, mixed) == CONV_MACS * 64 + FC_MACS * 1024


def test_weight_bytes():
    from types import SimpleNamespace

    from modiff_export.manifest import LayerInfo

    m = SimpleNamespace(layers=(LayerInfo("a", "conv", (8, 3, 3, 3), False, 4, 4, True),
                                LayerInfo("b", "linear", (10, 128), True, None, None, False)))
    assert cost.weight_bytes(m) == 216 + 1280 * 4
    assert cost.packed_weight_bytes(m) == 108 + 1280 * 4


def _results():
    g = torch.Generator().manual_seed(0)
    imgs = lambda: torch.rand(16, 1, 16, 16, generator=g) * 2 - 1  # noqa: E731
    tags = ["fp", "peer", "ptq-w8a8", "modiff-w8a8", "ptq-w4a4", "modiff-w4a4"]
    lat = {"fp": {"prime": 0.010}, "peer": {"prime": 0.008}, "modiff-w8a8": {"prime": 0.012, "step": 0.005}}
    return {
        "title": "test report", "settings": {"model": "random"}, "notes": ["engine: skipped"],
        "bits": ["W8A8", "W4A4"], "grids": {t: imgs() for t in tags},
        "quality": [{"config": t, "fd": 1.0 + i, "confidence": 0.9, "psnr": float("inf") if t == "fp" else 20.0 + i}
                    for i, t in enumerate(tags)],
        "parity": [{"config": "modiff-w8a8", "psnr": 60.0, "max_abs_image": 1e-5, "max_abs_eps": 2e-5}],
        "cost": [{"config": t, "bops_prime": 1e9, "bops_step": 2e8 if t.startswith("modiff") else None,
                  "bops_traj": 5e9,
                  "weight_bytes": 1000, "cache_bytes": 0, "latency": lat.get(t, {})} for t in tags],
        "speed": {"batch": 16, "cpu": "test cpu", "flags": {"avx2": True}, "rows": [("FP32 graph", 0.01), ("step",
                                                                                                           0.005)],
                  "ref": "FP32 graph"},
    }


def test_report_builder(tmp_path):
    from modiff_export.harness.report import build_report

    path = build_report(tmp_path / "rep", _results())
    text = path.read_text()
    for needle in ("## Quality", "| modiff-w8a8 | 4.00 | 0.900 | 23.00 |", "| fp | 1.00 | 0.900 | inf |",
                   "| modiff-w8a8 | 60.00 | 1.00e-05 | 2.00e-05 |", "MACs x weight bits x activation bits",
                   "12.0 (1.20)", "5.0 (0.50)", "| step | 5.0 | 0.50 |", "avx2 yes"):
        assert needle in text, needle
    for png in ("grid.png", "quality.png"):
        data = (tmp_path / "rep" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp folder renamed away


def test_tile_layout():
    from modiff_export.harness.report import tile

    x = -torch.ones(4, 1, 2, 2)
    x[3] = 1
    t = tile(x, nrow=2, pad=1)
    assert t.shape == (7, 7)
    assert t[4, 4] == 1.0 and t[1, 1] == 0.0 and t[0, 0] == 1.0  # image 3 white, image 0 black, padding white


def test_peer_settings_are_w8a8_qdq_on_compute_ops():
    """The peer stays a W8A8 QDQ quantize_static call restricted to Conv/MatMul/Gemm, and the report
    line names every setting."""
    from modiff_export.harness.peer import PEER_SETTINGS, peer_settings_text

    s = PEER_SETTINGS
    assert s["quant_format"] == "QDQ" and s["per_channel"] is True
    assert s["activation_type"] in ("QInt8", "QUInt8") and s["weight_type"] == "QInt8"
    assert s["op_types_to_quantize"] == ["Conv", "MatMul", "Gemm"]
    text = peer_settings_text(s)
    for needle in ("QDQ", "per_channel=True", "Conv", s["calibrate_method"], *s["extra_options"]):
        assert needle in text, needle
