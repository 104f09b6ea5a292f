"""Triton Python-backend model `modiff` (written by `cli.py package-triton`): the diffusion sampler.

A client sends `seed` INT64 [1] and `steps` INT32 [1] (optional `scheduler` BYTES [1]; conditional
UNets: optional `guidance_scale` FP32 [1], `encoder_hidden_states` FP32 [S, D]; class-conditional models
(DiT): `class_label` INT64 [1] in 0..num_classes-1, optional `guidance_scale`, whose uncond half is the
null class num_classes, sent as the UNet's `class_labels`) and gets `image` FP32 [C, H, W]. Each
image is one trajectory: a sequence of BLS calls to the stateful UNet model with its own
correlation id (START on the first call, END on the last), so Triton keeps that image's MoDiff caches
as implicit state and batches the steps of concurrent trajectories together. All requests of a batch
run concurrently (asyncio). Needs numpy, torch and diffusers in the Python backend's environment.

Every request is answered on its own: a bad one gets INVALID_ARG (HTTP 400), a failed trajectory
INTERNAL, both one line; beyond `max_inflight` trajectories at once a request gets UNAVAILABLE (HTTP 503,
"busy") at once. `execute` is async, so Triton's queue in front of this model empties at once and cannot
bound the load by itself. A trajectory that fails mid-way leaves its UNet sequence without END: the UNet
frees it after the sequence idle timeout.
"""
import asyncio
import inspect
import itertools
import json
import os
import random

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "pndm": PNDMScheduler,
              "dpmpp": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler,
              "euler_a": EulerAncestralDiscreteScheduler, "unipc": UniPCMultistepScheduler,
              "flow_euler": FlowMatchEulerDiscreteScheduler, "flow_heun": FlowMatchHeunDiscreteScheduler}
FLOW = ("flow_euler", "flow_heun")  # COPY of sampling.FLOW
OVERRIDES = {"pndm": {"skip_prk_steps": True}, "dpmpp": {"algorithm_type": "dpmsolver++", "solver_order": 2}}
EHS_SEED_OFFSET = 1_000_003  # COPY of sampling.ENCODER_SEED_OFFSET (tests/test_sampling.py checks it)


class BadRequest(ValueError):
    pass


def pack(x):
    """COPY of models/denoiser.pack (FluxPipeline._pack_latents): [B, C, H, W] -> [B, (H/2)(W/2), C*4]."""
    B, C, H, W = x.shape
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack(x, hw):
    """COPY of models/denoiser.unpack: [B, (H/2)(W/2), C*4] -> [B, C, H, W]."""
    (B, _, C4), (H, W) = x.shape, hw
    return x.view(B, H // 2, W // 2, C4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C4 // 4, H, W)


def flow_shift_mu(scheduler_config, sample_shape):
    """COPY of sampling.flow_shift_mu (tests/test_sampling.py checks it): FLUX's resolution-dependent shift."""
    if not scheduler_config.get("use_dynamic_shifting"):
        return None
    h, w = int(sample_shape[-2]), int(sample_shape[-1])
    seq = (h // 2) * (w // 2)
    lo, hi = scheduler_config.get("base_image_seq_len", 256), scheduler_config.get("max_image_seq_len", 4096)
    b, m = scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.15)
    slope = (m - b) / (hi - lo)
    return seq * slope + (b - slope * lo)


class TritonPythonModel:
    num_classes = None  # class-conditional models: their number of classes (initialize reads it)
    masked = False  # the UNet takes encoder_attention_mask (PixArt): sent as all ones (no padding)

    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.unet = p["unet_model"]
        self.sample_shape = tuple(json.loads(p["sample_shape"]))
        self.ehs_shape = tuple(json.loads(p["ehs_shape"])) if p.get("ehs_shape") else None
        self.num_classes = int(p["num_classes"]) if p.get("num_classes") else None
        self.masked = p.get("masked") == "1"
        # the named conditioning inputs (models/conditioning.py Conditioning.to_list); older repositories: none
        # beyond the states / labels / mask above
        self.conditioning = json.loads(p["conditioning"]) if p.get("conditioning") else self._legacy_conditioning()
        self.packed = p.get("packed") == "1"
        self.max_steps = int(p["max_steps"])
        self.default_scheduler = p["default_scheduler"]
        self.max_inflight = int(p.get("max_inflight", "64"))
        self.inflight = 0  # trajectories running (execute runs on one event loop: no lock needed)
        here = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(here, "scheduler_config.json")) as f:
            raw = json.load(f)
        self.flow_model = str(raw.get("_class_name", "")).startswith("FlowMatch")  # COPY of sampling.objective
        self.scheduler_config = {k: v for k, v in raw.items() if not k.startswith("_")}
        # correlation ids unique across instances and restarts of this model
        self.ids = itertools.count(random.SystemRandom().randrange(1 << 40, 1 << 62))
        torch.set_num_threads(1)

    def _legacy_conditioning(self):
        if self.num_classes is not None:
            return [{"name": "class_labels", "shape": [], "dtype": "int64", "kind": "labels",
                     "num_classes": self.num_classes}]
        if self.ehs_shape is None:
            return []
        out = [{"name": "encoder_hidden_states", "shape": list(self.ehs_shape), "dtype": "float32",
                "kind": "embedding"}]
        if self.masked:
            out.append({"name": "encoder_attention_mask", "shape": [self.ehs_shape[0]], "dtype": "float32",
                        "kind": "mask"})
        return out

    def _input(self, request, name, dtype=None):
        t = pb_utils.get_input_tensor_by_name(request, name)
        return None if t is None else t.as_numpy()

    def _parse(self, request):
        seed, steps = self._input(request, "seed"), self._input(request, "steps")
        sched = self._input(request, "scheduler")
        gs = self._input(request, "guidance_scale")
        ehs = self._input(request, "encoder_hidden_states")
        label = self._input(request, "class_label")
        name = self.default_scheduler if sched is None else sched.reshape(-1)[0]
        name = name.decode() if isinstance(name, bytes) else str(name)
        given = {}
        for c in self.conditioning:  # per-request values of the content inputs and time_ids (optional)
            v = ehs if c["name"] == "encoder_hidden_states" else self._input(request, c["name"]) \
                if c["kind"] in ("embedding", "time_ids") else None
            if v is not None:
                given[c["name"]] = torch.from_numpy(np.array(v.reshape(c["shape"]), np.float32))
        item = {"seed": int(seed.reshape(-1)[0]), "steps": int(steps.reshape(-1)[0]), "scheduler": name,
                "guidance_scale": 1.0 if gs is None else float(gs.reshape(-1)[0]), "given": given,
                "label": None if label is None else int(label.reshape(-1)[0])}
        if seed.size != 1 or steps.size != 1:
            raise BadRequest("send one image per request: seed and steps of shape [1, 1]")
        if not 1 <= item["steps"] <= self.max_steps:
            raise BadRequest(f"steps={item['steps']} out of range [1, {self.max_steps}]")
        if item["scheduler"] not in SCHEDULERS:
            raise BadRequest(f"unknown scheduler {item['scheduler']!r}; expected one of {sorted(SCHEDULERS)}")
        flow_model = getattr(self, "flow_model", None)
        if flow_model is None:  # set by initialize; tests build the model without it
            flow_model = str(self.scheduler_config.get("_class_name", "")).startswith("FlowMatch")
        if (item["scheduler"] in FLOW) != flow_model:
            raise BadRequest(f"scheduler {item['scheduler']!r} does not fit this model (trained for "
                             f"{'flow matching' if flow_model else 'noise prediction'})")
        n = self.num_classes
        guided = any(c["kind"] in ("embedding", "labels", "guidance") for c in self.conditioning)
        if not abs(item["guidance_scale"]) < 1e4 or (item["guidance_scale"] != 1.0 and not guided):
            raise BadRequest(f"guidance_scale={item['guidance_scale']} is not valid for this model")
        # COPY of the class-label checks of modiff_export.serving.sampler.check_item (same messages)
        if n is not None and item["label"] is None:
            raise BadRequest(f"input 'class_label' is missing: this model is class-conditional (labels 0..{n - 1})")
        if n is not None and not 0 <= item["label"] < n:
            raise BadRequest(f"class_label={item['label']} is outside 0..{n - 1} (the model has {n} classes)")
        return item

    async def _unet(self, cid, sample, t, cond, flags):
        if self.packed:  # FLUX: the UNet model takes packed latents
            hw, sample = sample.shape[-2:], pack(sample)
        inputs = [pb_utils.Tensor("sample", sample.numpy()), pb_utils.Tensor("timestep", np.array([[t]], np.float32))]
        for name, x in cond.items():  # [1, ...]; [1] inputs (labels, guidance) sent as [1, 1]: the config's dims
            inputs.append(pb_utils.Tensor(name, x.numpy().reshape(1, -1) if x.dim() == 1 else x.numpy()))
        req = pb_utils.InferenceRequest(model_name=self.unet, inputs=inputs, requested_output_names=["noise_pred"],
                                        correlation_id=cid, flags=flags)
        resp = await req.async_exec()
        if resp.has_error():
            raise RuntimeError(f"{self.unet}: {resp.error().message()}")
        out = torch.from_numpy(pb_utils.get_output_tensor_by_name(resp, "noise_pred").as_numpy().copy())
        return unpack(out, hw) if self.packed else out

    def _conditioning(self, it, image_hw):
        """COPY of modiff_export.serving.sampler.item_conditioning: (cond, uncond) {name: [1, ...]}."""
        g = torch.Generator().manual_seed(it["seed"] + EHS_SEED_OFFSET)
        cond, unc = {}, {}
        for c in self.conditioning:
            name, kind, shape = c["name"], c["kind"], tuple(c["shape"])
            if kind == "labels":
                cond[name] = torch.tensor([it["label"]], dtype=torch.int64)
                unc[name] = torch.full_like(cond[name], c["num_classes"])
            elif kind == "embedding":
                x = it["given"].get(name)
                cond[name] = (x if x is not None else torch.randn((1, *shape), generator=g)[0])[None]
                unc[name] = torch.zeros_like(cond[name])
            elif kind == "guidance":
                cond[name] = unc[name] = torch.tensor([float(it["guidance_scale"])])
            elif kind == "time_ids":
                h, w = image_hw[0] * 8, image_hw[1] * 8
                x = it["given"].get(name)
                default = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)  # image size, no crop
                cond[name] = unc[name] = x[None] if x is not None else default
            else:  # mask [1, S]: every caption token attended (a request carries states, not a mask)
                cond[name] = unc[name] = torch.ones((1, *shape))
        return cond, unc

    async def _trajectory(self, it):
        # COPY of modiff_export.sampling.denoise (this file runs where the package is absent), one request
        # per image; tests/test_sampling.py::test_triton_sampler_copy_matches_denoise keeps them equal.
        sched = SCHEDULERS[it["scheduler"]].from_config({**self.scheduler_config, **OVERRIDES.get(it["scheduler"], {})})
        gen = torch.Generator().manual_seed(it["seed"])
        x = torch.randn((1, *self.sample_shape), generator=gen)
        ehs, unc = self._conditioning(it, self.sample_shape[-2:])
        embedded = any(c["kind"] == "guidance" for c in self.conditioning)  # FLUX.1-dev: the scale is an input
        cfg = it["guidance_scale"] != 1.0 and not embedded
        ids = [next(self.ids) for _ in range(2 if cfg else 1)]  # cond (and uncond) sequences
        params = inspect.signature(sched.step).parameters
        kw = ({"generator": gen} if "generator" in params else {}) | ({"eta": 0.0} if "eta" in params else {})
        mu = flow_shift_mu(sched.config, x.shape)
        sched.set_timesteps(it["steps"], **({} if mu is None else {"mu": mu}))
        x = x * getattr(sched, "init_noise_sigma", 1.0)
        scale = getattr(sched, "scale_model_input", lambda x, t: x)
        n = len(sched.timesteps)
        for i, t in enumerate(sched.timesteps):
            flags = (pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START if i == 0 else 0) | (
                pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END if i == n - 1 else 0)
            inp = scale(x, t)
            if cfg:
                eps_c, eps_u = await asyncio.gather(self._unet(ids[0], inp, float(t), ehs, flags),
                                                    self._unet(ids[1], inp, float(t), unc, flags))
                eps = eps_u + it["guidance_scale"] * (eps_c - eps_u)
            else:
                eps = await self._unet(ids[0], inp, float(t), ehs, flags)
            x = sched.step(eps, t, x, **kw).prev_sample
        return x.clamp(-1, 1)[0].numpy()

    @staticmethod
    def _error(message, code):
        line = " ".join(str(message).split())[:500]
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(line, code))

    async def _one(self, request):
        try:
            item = self._parse(request)
            image = await self._trajectory(item)
        except BadRequest as e:
            return self._error(e, pb_utils.TritonError.INVALID_ARG)
        except Exception as e:  # noqa: BLE001 (the UNet model failed: this request fails, the others go on)
            return self._error(f"{type(e).__name__}: {e}", pb_utils.TritonError.INTERNAL)
        finally:
            self.inflight -= 1
        return pb_utils.InferenceResponse([pb_utils.Tensor("image", image[None].astype(np.float32))])

    async def execute(self, requests):
        out, run = [None] * len(requests), []
        for k in range(len(requests)):
            if self.inflight >= self.max_inflight:
                out[k] = self._error(f"server busy: {self.inflight} trajectories in flight (max_inflight "
                                     f"{self.max_inflight}); retry later", pb_utils.TritonError.UNAVAILABLE)
            else:
                self.inflight += 1
                run.append(k)
        for k, resp in zip(run, await asyncio.gather(*(self._one(requests[k]) for k in run))):
            out[k] = resp
        return out
