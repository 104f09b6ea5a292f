"""`cli.py evaluate` end to end: FD-digits, classifier confidence and PSNR-to-FP for the embedded
(digits-trained) models, the UNet and the class-conditional DiT alike."""
from __future__ import annotations

import math

import pytest
from reliability_util import run_cli


@pytest.mark.parametrize("model", ["digits", "digits_dit"])
def test_evaluate_reports_fd_for_every_embedded_model(model):
    code, out, err = run_cli(["evaluate", "--model", model, "--act-bits", "8", "--num-samples", "8",
                              "--batch-size", "8", "--steps", "4"])
    assert code == 0, err
    rows = {line.split()[0]: line.split()[-4:] for line in out.splitlines()[2:] if line.strip()}
    assert set(rows) == {"fp", "modiff-w8a8"}, out
    for tag, (fd, conf, _, _) in rows.items():
        assert float(fd) > 0 and 0.0 <= float(conf) <= 1.0, (tag, out)  # "n/a" fails float()
    assert rows["fp"][2] == "inf" and math.isfinite(float(rows["modiff-w8a8"][2])), out
