"""Model loading: the embedded digits model, local diffusers folders, content hash, bad folders."""
import json

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from modiff_export.models import ModelError, content_hash, load_model


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
                       norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("unet")
    tiny_unet().save_pretrained(path)
    return path


def test_load_digits():
    m = load_model("digits")
    assert m.name == "digits" and not m.conditional and m.cross_attention_dim is None and m.encoder_seq_len is None
    assert m.sample_shape == (1, 16, 16) and not m.unet.training
    assert all(p.dtype == torch.float32 for p in m.unet.parameters())
    assert any("attentions" in n for n, _ in m.unet.named_modules())
    assert m.scheduler_config["num_train_timesteps"] == 1000
    assert m.content_hash.startswith("sha256:") and len(m.content_hash) == 7 + 64
    assert load_model("digits").content_hash == m.content_hash  # stable across loads


def test_content_hash_changes_with_one_weight():
    unet = tiny_unet()
    h = content_hash(unet)
    assert content_hash(unet) == h
    with torch.no_grad():
        unet.conv_in.weight[0, 0, 0, 0] += 1e-6
    assert content_hash(unet) != h


def test_unet_folder_defaults_to_ddpm(unet_folder):
    m = load_model(str(unet_folder))
    assert m.scheduler_config == {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}
    assert m.content_hash == content_hash(tiny_unet()) and m.sample_shape == (1, 8, 8)


def test_pipeline_folder_and_conditional(tmp_path):
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                         norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).save_pretrained(tmp_path / "unet")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear"}))
    m = load_model(str(tmp_path))
    assert m.conditional and m.cross_attention_dim == 32 and m.encoder_seq_len == 77 and m.sample_shape == (4, 8, 8)
    assert m.scheduler_config["beta_schedule"] == "scaled_linear"


def _bad(tmp_path, unet_folder, kind):
    import shutil

    if kind == "missing":
        return tmp_path / "nope"
    if kind == "empty":
        return tmp_path
    shutil.copytree(unet_folder, tmp_path / "m")
    path = tmp_path / "m"
    if kind == "wrong_class":
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, "_class_name": "AutoencoderKL"}))
    elif kind == "bad_json":
        (path / "config.json").write_text("{not json")
    elif kind == "no_weights":
        (path / "diffusion_pytorch_model.safetensors").unlink()
    elif kind == "truncated":
        w = path / "diffusion_pytorch_model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return path


@pytest.mark.parametrize("kind", ["missing", "empty", "wrong_class", "bad_json", "no_weights", "truncated"])
def test_bad_folders_raise_model_error(tmp_path, unet_folder, kind):
    path = _bad(tmp_path, unet_folder, kind)
    with pytest.raises(ModelError) as e:
        load_model(str(path))
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    assert ("expected" in msg) or ("cannot load" in msg)
