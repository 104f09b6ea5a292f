"""Quality metrics: PSNR (quantized vs full precision) and FD-digits / confidence from a small
digits classifier trained on the same training split as the embedded model (train.py).

FD-digits is the FID recipe with our classifier instead of Inception: the Frechet distance between
Gaussians fitted to penultimate-layer features of generated samples and of held-out real digits.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..errors import ModiffExportError
from ..models.classifier import load_classifier
from ..models.loading import ASSETS


class MetricsError(ModiffExportError):
    pass


def _check_images(x: torch.Tensor, name: str = "samples") -> torch.Tensor:
    if not torch.is_tensor(x) or x.dim() != 4 or tuple(x.shape[1:]) != (1, 16, 16):
        raise MetricsError(f"{name}: expected digits images [B, 1, 16, 16], got {tuple(getattr(x, 'shape', ()))}")
    if not torch.isfinite(x).all():
        raise MetricsError(f"{name}: contains NaN or Inf")
    return x.float().clamp(-1, 1)


def frechet_distance_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), features [N, D] (float64)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    # Tr sqrt(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))), symmetric PSD: stable via eigh
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return max(0.0, float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean))


class DigitsEvaluator:
    """FD-digits and confidence of generated digits against the held-out test split."""

    def __init__(self, folder: str | Path = ASSETS):
        from ..models.data import digits_split

        self.classifier = load_classifier(folder)
        self.real, self.real_labels = digits_split("test")  # [N, 1, 16, 16], [N]
        self.real_features = self.features(self.real)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> np.ndarray:
        return self.classifier.features(_check_images(x)).double().numpy()  # [B, 64]

    def frechet_distance(self, samples: torch.Tensor) -> float:
        if len(samples) < 2:
            raise MetricsError(f"FD needs at least 2 samples, got {len(samples)}")
        return frechet_distance_from_features(self.features(samples), self.real_features)

    @torch.no_grad()
    def confidence(self, samples: torch.Tensor) -> float:
        """Mean max softmax probability: how sure the classifier is that each sample is a digit."""
        p = self.classifier(_check_images(samples)).softmax(-1)  # [B, 10]
        return float(p.max(-1).values.mean())

    @torch.no_grad()
    def label_accuracy(self, samples: torch.Tensor, labels: torch.Tensor) -> float:
        """Class-conditional models: the share of samples [B, 1, 16, 16] the classifier reads as their
        requested digit labels [B] (the null class never counts as a hit)."""
        if len(samples) != len(labels):
            raise MetricsError(f"label_accuracy: {len(samples)} samples but {len(labels)} labels")
        pred = self.classifier(_check_images(samples)).argmax(-1)  # [B]
        return float((pred == labels.to(pred.dtype)).float().mean())


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """10 log10(range^2 / MSE) in dB; inf for identical inputs. Images in [-1, 1] by default."""
    if a.shape != b.shape:
        raise MetricsError(f"psnr: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = float((a.double() - b.double()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)
