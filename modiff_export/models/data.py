"""The handwritten digits that scikit-learn ships (no download), as 16x16 images in [-1, 1].

load_digits(): 1797 images, 8x8, integer values 0..16. We upsample them to 16x16 (bilinear),
scale to [-1, 1], and split 80/20 with a fixed seed; the held-out 20% is what metrics compare to.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SPLIT_SEED = 0
TEST_FRACTION = 0.2
IMAGE_SIZE = 16


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as (images [N, 1, 16, 16] in [-1, 1], labels [N] int64)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).contiguous()  # [N, 1, 16, 16] in [-1, 1]
    return x, torch.from_numpy(d.target.astype(np.int64))


def digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """split: "train" (80%) or "test" (20%, held out), fixed by SPLIT_SEED."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    x, y = digits_tensors()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(len(x) * TEST_FRACTION))
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    return x[idx], y[idx]


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to +-max_shift pixels (background -1 fills the gap). [B,C,H,W]."""
    if max_shift <= 0:
        return x
    B, _, H, W = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator)
    return torch.stack([pad[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])
