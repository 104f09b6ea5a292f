"""Metrics: PSNR, Frechet distance, classifier confidence on real held-out digits."""
import math

import numpy as np
import pytest
import torch

from modiff_export.evaluation.metrics import DigitsEvaluator, MetricsError, frechet_distance_from_features, psnr
from modiff_export.models.data import digits_split


@pytest.fixture(scope="module")
def evaluator():
    return DigitsEvaluator()


def test_psnr():
    a = torch.rand(4, 1, 16, 16) * 2 - 1
    assert psnr(a, a.clone()) == math.inf
    assert psnr(a, a + 0.1) == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-6)  # 26.02 dB
    assert psnr(a, a + 0.1, data_range=1.0) == pytest.approx(20.0, abs=1e-6)
    with pytest.raises(MetricsError):
        psnr(a, a[:2])


def test_frechet_distance_of_shifted_gaussian():
    f = np.random.default_rng(0).normal(size=(500, 8))
    shift = np.arange(8) * 0.1
    assert frechet_distance_from_features(f, f + shift) == pytest.approx((shift**2).sum(), rel=1e-6)
    assert frechet_distance_from_features(f, f * 2) > 1.0  # covariance differs


def test_fd_and_confidence_on_real_digits(evaluator):
    real, _ = digits_split("test")
    assert evaluator.frechet_distance(real) < 1e-3
    noise = torch.rand(len(real), 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert evaluator.frechet_distance(noise) > 100 * max(1.0, evaluator.frechet_distance(digits_split("train")[0]) / 10)
    assert evaluator.confidence(real) > 0.9
    with pytest.raises(MetricsError, match=r"expected digits images \[B, 1, 16, 16\]"):
        evaluator.confidence(torch.zeros(2, 1, 8, 8))


def test_split_is_fixed_and_disjoint():
    a, _ = digits_split("test")
    b, _ = digits_split("train")
    assert len(a) == 359 and len(b) == 1438 and torch.equal(a, digits_split("test")[0])
    assert a.min() == -1 and a.max() == 1


def test_label_accuracy_reads_the_requested_digit(evaluator):
    """Held-out digits with their own labels score near the classifier's accuracy; the same images asked
    to be the next digit score near zero; a length mismatch is an error, not a silent truncation."""
    x, y = digits_split("test")
    assert evaluator.label_accuracy(x, y) > 0.9
    assert evaluator.label_accuracy(x, (y + 1) % 10) < 0.1
    with pytest.raises(MetricsError, match="labels"):
        evaluator.label_accuracy(x, y[:-1])
