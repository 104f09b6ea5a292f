"""The digits classifier behind FD-digits and confidence (evaluation/metrics.py): a small CNN trained on the
same split as the embedded UNets (models/train.py), shipped beside them as safetensors."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .loading import ASSETS, ModelError

CLASSIFIER_FILE = "classifier.safetensors"


class DigitsClassifier(nn.Module):
    """[B, 1, 16, 16] in [-1, 1] -> logits [B, 10]; features() is the 64-d penultimate layer."""

    def __init__(self, feat_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                        # [B, 32, 8, 8]
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [B, 64, 4, 4]
            nn.Flatten(), nn.Linear(64 * 16, feat_dim), nn.ReLU(),  # [B, feat_dim]
        )
        self.head = nn.Linear(feat_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def load_classifier(folder: str | Path = ASSETS) -> DigitsClassifier:
    from safetensors.torch import load_file

    path = Path(folder) / CLASSIFIER_FILE
    if not path.is_file():
        raise ModelError(f"{path}: missing; run `python cli.py train-demo` to train the digits classifier")
    model = DigitsClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()
