"""One error response per failed request of a dynamic batch, through PyTriton.

PyTriton (0.5 .. 0.7) answers one execution of an inference callable with one response per request or
with one error for all of them: an exception raised by the callable fails every request Triton batched
with the bad one, with a multi-line traceback as the message. Triton itself has no such limit: a
Python-backend model may return `InferenceResponse(error=TritonError(message, code))` for some
requests and images for the others.

This module closes the gap in the only place it can be closed, PyTriton's proxy model (the `model.py`
it writes into its Triton model store and that runs inside tritonserver's Python backend):
`per_request_errors()` makes the proxy of the models bound inside it turn a response dict that holds
`ERROR_OUTPUT` into a Triton error response with that code and message. The callable returns
`error_response(code, message)` for a failed request and its outputs for the others.

Contract: the model must declare `ERROR_OUTPUT` as an output (BYTES [1]: PyTriton's strict validation
checks every key a callable returns); it is never sent to a client. If PyTriton's proxy model is not the
one this was written for (the hook `_wrap_response` is missing), binding fails with ProxyPatchError
instead of serving error dicts as 200 responses.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from ..errors import ModiffExportError

ERROR_OUTPUT = "error"
INVALID_ARG, INTERNAL, UNAVAILABLE = "INVALID_ARG", "INTERNAL", "UNAVAILABLE"  # names of pb_utils.TritonError codes
_HOOK = "def _wrap_response(response: Response, requested_outputs_names, model_outputs_dict):"
_CALL = "_wrap_response(response, request.requested_output_names(), self._model_outputs_dict)"
_MARK = "# -- modiff_export.serving.pytriton_errors"
_OVERRIDE = f'''

{_MARK}: a response holding "{ERROR_OUTPUT}" is that request's own error response --------
import json as _modiff_json

_pytriton_wrap_response = _wrap_response


def _wrap_response(response, requested_outputs_names, model_outputs_dict):  # noqa: F811
    data = response.data
    if data is not None and "{ERROR_OUTPUT}" in data:
        err = _modiff_json.loads(bytes(data["{ERROR_OUTPUT}"].reshape(-1)[0]).decode("utf-8"))
        code = getattr(pb_utils.TritonError, err.get("code", "{INTERNAL}"), pb_utils.TritonError.INTERNAL)
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(err["message"], code))
    return _pytriton_wrap_response(response, requested_outputs_names, model_outputs_dict)
'''


class ProxyPatchError(ModiffExportError, RuntimeError):
    """The installed PyTriton's proxy model cannot carry per-request errors."""


def error_response(code: str, message: str) -> dict[str, np.ndarray]:
    """The response dict of one failed request: `code` is a pb_utils.TritonError code name (INVALID_ARG:
    HTTP 400 / gRPC INVALID_ARGUMENT; INTERNAL: 500), `message` its one line."""
    line = " ".join(str(message).split())[:500]
    return {ERROR_OUTPUT: np.array([[json.dumps({"code": code, "message": line}).encode()]], dtype=np.bytes_)}


def patch_proxy_source(text: str) -> str:
    """PyTriton's proxy model source with the per-request error hook appended (idempotent)."""
    if _MARK in text:
        return text
    if text.count(_HOOK) != 1 or _CALL not in text:
        import pytriton

        raise ProxyPatchError(f"nvidia-pytriton {getattr(pytriton, '__version__', '?')}: its proxy model has no "
                              "_wrap_response hook, so a bad request cannot get its own error; serve was written "
                              "for nvidia-pytriton 0.5 .. 0.7")
    return text + _OVERRIDE


@contextlib.contextmanager
def per_request_errors():
    """Inside: models bound to a PyTriton `Triton` get the patched proxy, whether PyTriton writes it into a
    local model store (generate_model) or sends it with the load request (get_proxy_model_files)."""
    from pytriton.models import model as pt_model

    generate, files = pt_model.Model.generate_model, pt_model.Model.get_proxy_model_files

    def generate_model(self, model_repository: Path) -> None:
        generate(self, model_repository)
        path = Path(model_repository) / self.model_name / str(self.model_version) / "model.py"
        path.write_text(patch_proxy_source(path.read_text()))

    def get_proxy_model_files(self) -> dict[str, bytes]:
        out = files(self)
        key = f"file:{self.model_version}/model.py"
        if key not in out:
            raise ProxyPatchError(f"PyTriton sends no {key} with the model: cannot add per-request errors")
        out[key] = patch_proxy_source(out[key].decode("utf-8")).encode("utf-8")
        return out

    pt_model.Model.generate_model, pt_model.Model.get_proxy_model_files = generate_model, get_proxy_model_files
    try:
        yield
    finally:
        pt_model.Model.generate_model, pt_model.Model.get_proxy_model_files = generate, files
