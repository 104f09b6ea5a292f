"""Block reuse on a (quantized) diffusers denoiser (docs/design.md section 1.1): DeepCache on UNets,
compensated middle-block reuse on transformers. One vocabulary for both: the *reuse depth* D is how much of
each end is computed on every call; the *deep branch* is the rest, computed only on full calls; its
*feature* is what reused (shallow) calls read instead of computing it.

UNets: D counts down/up block pairs from the outside. The deep branch of depth D is everything the outer D
pairs wrap: the downsampler of down_blocks[D-1] (its output feeds only the deep branch), down_blocks[D:],
mid_block and up_blocks[:-D]. The feature is its output (the input of up_blocks[-D]; the mid block's output
when D is the number of blocks).

Transformers (DiT, PixArt, SD3, FLUX): D counts blocks at each end of the block sequence (FLUX: the double
blocks, then the single blocks). The deep branch is blocks[D:n-D]; the feature is their *residual*, output
minus input, [B, T, C] (SD3/FLUX's two streams: [B, S + N, C], the text tokens first, as FLUX's single
blocks concatenate them), the form First-Block-Cache and TeaCache reuse: the shallow part's own change
still reaches the output. A full call computes the residual and hands the outer blocks input + residual (one
Sub and one Add, so a full call and a shallow call read the feature through the same arithmetic and the
OpenVINO cut of backends/ov_split.py finds the feature between its parts).

    full call:    the whole model; the feature is recorded
    shallow call: the embeddings, the outer blocks and the final layer; the deep branch is not computed,
                  its modules return their input and the feature source returns the recorded feature
                  (transformers: the entry input + the recorded residual)

With a forecast (reuse_forecast "linear" or "taylor", quant/forecast.py) a shallow call reads the extrapolated
feature instead (design section 1.2): the module applies it itself when it schedules its own calls (phase
None: a diffusers pipeline, direct calls); when a runner sets the phase (and when tracing the graphs) the
module returns the recorded feature and the runner (backends/base.py) writes the forecast into it, as it
does for the exported graphs.

The deep layers are not called on a shallow call, so their MoDiff caches stay as the last full call left
them: the next full call's delta x - a_hat spans every skipped call (with reuse_compensation=False those
layers update a_hat = x instead, the ablation). A module's forward is replaced by a bound method (so a
deepcopy of the model keeps working) that reads the model's `BlockReuse` state.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn

from ..errors import ModiffExportError
from .forecast import make_forecast


class ReuseError(ModiffExportError, ValueError):
    """Block reuse asked of a model that cannot do it (depth beyond its blocks, skip blocks, no mid block)."""

TWO_STREAM = ("SD3Transformer2DModel", "FluxTransformer2DModel")  # blocks take and return (text, image) states
# submodules of a block that the model also calls outside the block's forward: computed on every call, so never deep
CALLED_OUTSIDE = {"DiTTransformer2DModel": ("transformer_blocks.0.norm1.emb",)}  # DiT's final layer reads it


def reuses_call(i: int, interval: int, warmup: int = 0) -> bool:
    """Call i (0-based) of a trajectory is shallow: past the first `warmup` calls (all full), every call whose
    distance from the warmup's end is not a multiple of the interval (QuantConfig.reuse_warmup)."""
    return i >= warmup and (i - warmup) % interval != 0


class BlockReuse:
    """The reuse state of one UNet: which modules are deep, the recorded feature, what this call does.

    phase: None (automatic: every `interval`-th call of a trajectory is full), "full" or "shallow"."""

    def __init__(self, interval: int, depth: int, deep_prefixes: tuple[str, ...], source: str,
                 forecast: str = "none", residual: bool = False, warmup: int = 0):
        self.interval, self.depth, self.warmup = interval, depth, warmup
        self.forecast = make_forecast(forecast, interval)  # used when phase is None (the module schedules itself)
        self.deep_prefixes, self.source = deep_prefixes, source
        self.phase: str | None = None
        self.reusing = False
        self.feature = None
        self.calls = 0
        self.outside: tuple[str, ...] = ()  # CALLED_OUTSIDE of the model
        self.residual = residual  # transformers: the feature is the deep blocks' residual (module docstring)
        self.entry = None  # transformers: this call's input of the first deep block, [B, T, C]
        self.text_len = 0  # transformers with two streams: S, the text tokens in front of the image's in `entry`

    def is_deep(self, name: str) -> bool:
        def under(prefixes):
            return any(name == p or name.startswith(p + ".") for p in prefixes)
        return under(self.deep_prefixes) and not under(self.outside)

    def reset(self) -> None:
        self.feature, self.entry, self.calls, self.reusing = None, None, 0, False
        if self.forecast is not None:
            self.forecast.reset()

    def begin_call(self) -> None:
        """Decide whether this call reuses (phase, else the schedule) and count it."""
        self.reusing = self.phase == "shallow" if self.phase else reuses_call(self.calls, self.interval, self.warmup)
        self.calls += 1


def deep_branch(unet: nn.Module, depth: int) -> tuple[tuple[str, ...], str]:
    """(module names of the deep branch of `depth`, name of the module whose output is the feature)."""
    if hasattr(unet, "transformer_blocks"):
        return transformer_deep_branch(unet, depth)
    down, up = getattr(unet, "down_blocks", None), getattr(unet, "up_blocks", None)
    what = type(unet).__name__
    if down is None or up is None or len(down) != len(up):
        raise ReuseError(f"{what} has no matching down_blocks/up_blocks; block reuse needs a diffusers UNet")
    n = len(down)
    if not 1 <= depth <= n:  # (depth 0, every block reused, is a transformer's: a UNet has nothing left to compute)
        raise ReuseError(f"reuse_depth {depth} is outside 1..{n}: {what} has {n} down/up block pairs")
    if any(hasattr(b, "skip_conv") for b in (*down, *up)):
        raise ReuseError(f"{what} has skip blocks (SkipDownBlock2D/SkipUpBlock2D); block reuse does not support them")
    if depth == n and getattr(unet, "mid_block", None) is None:
        raise ReuseError(f"reuse_depth {depth} reuses only the mid block, and {what} has none; use a smaller depth")
    names = [f"down_blocks.{depth - 1}.downsamplers"] if getattr(down[depth - 1], "downsamplers", None) else []
    names += [f"down_blocks.{i}" for i in range(depth, n)]
    names += ["mid_block"] if getattr(unet, "mid_block", None) is not None else []
    names += [f"up_blocks.{i}" for i in range(n - depth)]
    return tuple(names), (f"up_blocks.{n - depth - 1}" if depth < n else "mid_block")


def transformer_blocks(model: nn.Module) -> list[str]:
    """Module names of a diffusers transformer's block sequence, in call order."""
    names = [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
    return names + [f"single_transformer_blocks.{i}" for i in range(len(getattr(model, "single_transformer_blocks",
                                                                                  ())))]


def transformer_deep_branch(model: nn.Module, depth: int) -> tuple[tuple[str, ...], str]:
    """The middle blocks blocks[depth:n-depth] and the last of them (whose output gives the residual)."""
    blocks, what = transformer_blocks(model), type(model).__name__
    n = len(blocks)
    if not 0 <= depth <= (n - 1) // 2:
        raise ReuseError(f"reuse_depth {depth} is outside 0..{(n - 1) // 2}: {what} has {n} transformer blocks, "
                         f"and depth D computes D at each end and reuses the {n} - 2D between them")
    deep = blocks[depth:n - depth]
    return tuple(deep), deep[-1]


def install(unet: nn.Module, interval: int, depth: int, forecast: str = "none", warmup: int = 0) -> BlockReuse:
    """Make the deep branch of `unet` skippable; the state is `unet.modiff_reuse`."""
    prefixes, source = deep_branch(unet, depth)
    if hasattr(unet, "transformer_blocks"):
        state = BlockReuse(interval, depth, prefixes, source, forecast, residual=True, warmup=warmup)
        state.outside = CALLED_OUTSIDE.get(type(unet).__name__, ())
        two = type(unet).__name__ in TWO_STREAM
        for name in prefixes:
            role = ("entry+" if name == prefixes[0] else "") + ("source" if name == source else "pass")
            module = unet.get_submodule(name)
            module.modiff_reuse, module.modiff_reuse_role, module.modiff_two_stream = state, role, two
            module.forward = types.MethodType(_block_forward, module)
        unet.modiff_reuse = state
        return state
    state = BlockReuse(interval, depth, prefixes, source, forecast, warmup=warmup)
    for name in prefixes:
        module = unet.get_submodule(name)
        role = "source" if name == source else "down" if name.startswith("down_blocks.") and "." not in name[12:] \
            else "pass"
        if isinstance(module, nn.ModuleList):  # downsamplers: each one passes its input through
            for m in module:
                _patch(m, state, "pass")
        else:
            _patch(module, state, role)
    if source not in prefixes:
        raise ReuseError(f"internal: the feature source {source} is not in the deep branch")
    unet.modiff_reuse = state
    return state


def _patch(module: nn.Module, state: BlockReuse, role: str) -> None:
    module.modiff_reuse, module.modiff_reuse_role = state, role
    module.forward = types.MethodType(_reuse_forward, module)


def _reuse_forward(self: nn.Module, *args, **kwargs):
    state = self.modiff_reuse
    own_forecast = state.forecast is not None and state.phase is None  # the module schedules itself
    if not state.reusing:
        out = type(self).forward(self, *args, **kwargs)
        if self.modiff_reuse_role == "source":
            state.feature = out
            if own_forecast:
                state.forecast.full(out)
        return out
    if self.modiff_reuse_role == "source":
        if state.feature is None:
            raise ReuseError("a shallow (reusing) call before any full call: the deep feature is empty")
        forecast = state.forecast.reused() if own_forecast else None
        return state.feature if forecast is None else forecast.clone()  # a clone: the buffer is rewritten
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if self.modiff_reuse_role == "down":  # (hidden, res_samples): only deep up blocks read these
        return hidden, (hidden,) * (len(self.resnets) + len(getattr(self, "downsamplers", None) or ()))
    return hidden


def _streams(args: tuple, kwargs: dict, two: bool) -> torch.Tensor:
    """The block's input as one [B, T, C] tensor (two streams: text then image tokens)."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if not two:
        return hidden
    text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
    return torch.cat([text, hidden], dim=1)


def _output(x: torch.Tensor, two: bool, text_len: int, pre_only: bool = False):
    """[B, T, C] back to the block's output form: hidden, or (text, hidden) for two-stream blocks (pre_only:
    x is the image tokens alone, and the block returns no text)."""
    if pre_only:
        return None, x
    return (x[:, :text_len], x[:, text_len:]) if two else x


def _block_forward(self: nn.Module, *args, **kwargs):
    """A deep transformer block (roles: entry = the first, source = the last; a block may be both)."""
    state, role, two = self.modiff_reuse, self.modiff_reuse_role, self.modiff_two_stream
    x = _streams(args, kwargs, two)  # [B, T, C]
    if role.startswith("entry"):
        state.entry = x
        # a Python int, also when tracing: a shape read in the graph would tie the outer blocks to the deep ones
        state.text_len = int(x.shape[1]) - int((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
                                               .shape[1])
    text_len = state.text_len
    own_forecast = state.forecast is not None and state.phase is None  # the module schedules itself
    # SD3's last block returns no text stream (context_pre_only): as the source, its residual is the image's
    pre_only = two and role.endswith("source") and getattr(self, "context_pre_only", False)
    if not state.reusing:
        out = type(self).forward(self, *args, **kwargs)
        if not role.endswith("source"):
            return out
        y = out[1] if pre_only else torch.cat([out[0], out[1]], dim=1) if two else out
        entry = state.entry[:, text_len:] if pre_only else state.entry
        state.feature = y - entry  # [B, T, C]: the deep blocks' residual
        if own_forecast:
            state.forecast.full(state.feature)
        return _output(entry + state.feature, two, text_len, pre_only)
    if not role.endswith("source"):
        return _output(x, two, text_len)
    if state.feature is None:
        raise ReuseError("a shallow (reusing) call before any full call: the deep feature is empty")
    forecast = state.forecast.reused() if own_forecast else None
    entry = state.entry[:, text_len:] if pre_only else state.entry
    return _output(entry + (state.feature if forecast is None else forecast), two, text_len, pre_only)
