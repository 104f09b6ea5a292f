"""digits_flux's and digits_sd3's text encoder: a learned table per class label, giving an MMDiT text-like
conditioning.

    enc = load_label_encoder("modiff_export/assets/digits_flux")     # label_encoder.safetensors, or None
    enc.conditioning(labels [B])   -> {"encoder_hidden_states": [B, S, D], "pooled_projections": [B, P]}

Row num_classes is the null class (classifier-free guidance's uncond), trained by label dropout
(models/train_mmdit.py). Sampling feeds a model folder's label encoder where it would otherwise use random
states (sampling.batch_conditioning), so class labels work on it as on a DiT.
"""
from __future__ import annotations

from pathlib import Path

import torch

LABEL_ENCODER_FILE = "label_encoder.safetensors"


class LabelEncoder(torch.nn.Module):
    """labels [B] int64 in 0..num_classes -> (encoder_hidden_states [B, S, D], pooled_projections [B, P])."""

    def __init__(self, num_classes: int, seq_len: int, joint_attention_dim: int, pooled_projection_dim: int):
        super().__init__()
        # unit-variance rows, like a text encoder's (normalised) outputs; distinct from the start
        self.states = torch.nn.Parameter(torch.randn(num_classes + 1, seq_len, joint_attention_dim))
        self.pooled = torch.nn.Parameter(torch.randn(num_classes + 1, pooled_projection_dim))

    @property
    def num_classes(self) -> int:
        return self.states.shape[0] - 1

    @property
    def seq_len(self) -> int:
        return self.states.shape[1]

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = labels.long()
        return self.states[labels], self.pooled[labels]

    def conditioning(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named conditioning inputs (models/conditioning.py) of these labels."""
        states, pooled = self(labels)
        return {"encoder_hidden_states": states, "pooled_projections": pooled}


def load_label_encoder(folder: str | Path) -> LabelEncoder | None:
    """The LabelEncoder saved in a model folder (LABEL_ENCODER_FILE); None when the folder has none."""
    from safetensors.torch import load_file

    path = Path(folder) / LABEL_ENCODER_FILE
    if not path.is_file():
        return None
    state = load_file(str(path))
    states, pooled = state["states"], state["pooled"]
    enc = LabelEncoder(states.shape[0] - 1, states.shape[1], states.shape[2], pooled.shape[1])
    enc.load_state_dict(state)
    return enc.eval().requires_grad_(False)
