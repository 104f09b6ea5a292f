"""Prompts encoded by a diffusers pipeline folder's own tokenizer and text encoder (offline), so a
text-to-image model is served on the distribution it was made for instead of random encoder states.

    enc = PromptEncoder("pipelines/sd")       # <folder>/tokenizer, <folder>/text_encoder (CLIP)
    enc.encode(["a red cat"])                 # [1, 77, D], what StableDiffusionPipeline.encode_prompt gives
    enc.negative                              # [77, D]: the empty prompt (classifier-free guidance's uncond)
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ModiffExportError


class PromptError(ModiffExportError, ValueError):
    pass


class PromptEncoder:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not (folder / "tokenizer").is_dir() or not (folder / "text_encoder").is_dir():
            raise PromptError(f"{folder}: not a pipeline folder with tokenizer/ and text_encoder/ (needed to "
                              f"encode prompts)")
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError:
            raise PromptError("encoding prompts needs transformers: pip install transformers") from None
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
            self.text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"),
                                                              local_files_only=True).eval()
        except (OSError, ValueError) as e:
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise PromptError(f"{folder}: cannot load the tokenizer/text encoder ({first})") from None
        self.negative = self.encode([""])[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.tokenizer.model_max_length), int(self.text_encoder.config.hidden_size))

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """[B, S, D] last hidden states, as StableDiffusionPipeline.encode_prompt computes them."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = (ids != self.tokenizer.pad_token_id).long()
        return self.text_encoder(ids, attention_mask=mask)[0].float()


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"{path}: cannot read prompts ({type(e).__name__})") from None
    prompts = [ln.strip() for ln in lines if ln.strip()]
    if not prompts:
        raise PromptError(f"{path}: no prompts (one per line)")
    return prompts


def encode_prompts(model, folder: str | None, file: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond [P, S, D], uncond [S, D]): the prompts in `file` encoded by pipeline `folder`'s text encoder,
    the empty prompt as uncond; for sampling.Trajectories(prompts=...), which cycles them over the images."""
    if folder is None or folder == "digits":
        raise PromptError("--prompts needs --model <diffusers pipeline folder> (its tokenizer/ and text_encoder/)")
    if not model.conditional:
        raise PromptError(f"--prompts needs a conditional UNet; {model.name} is unconditional")
    enc = PromptEncoder(folder)
    cond = enc.encode(read_prompts(file))  # [P, S, D]
    want = (model.encoder_seq_len, model.cross_attention_dim)
    if tuple(cond.shape[1:]) != tuple(want):
        raise PromptError(f"{folder}: the text encoder gives [{', '.join(map(str, cond.shape[1:]))}] states, "
                          f"the UNet takes {list(want)}")
    return cond, enc.negative
