"""Serving MoDiff: a Triton Inference Server (PyTriton) front end, a Triton model repository writer for
production servers, and a drop-in UNet for diffusers pipelines. See docs/serving.md."""
