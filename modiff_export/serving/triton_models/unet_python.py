"""Triton Python-backend model `modiff_unet` (`cli.py package-triton --unet-backend python`): the same
merged prime/step ONNX graph as the onnxruntime variant, run by ONNX Runtime inside the Python backend,
which keeps the MoDiff caches itself per correlation id (the Python backend has no implicit state).

For servers without the onnxruntime backend (e.g. the tritonserver bundled with nvidia-pytriton), and
for tests. Sequence controls: START, END (int32) and CORRID (uint64), strategy `oldest`: the steps of
concurrent sequences arrive together and run as one batch.
"""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

MIN_BATCH = 2  # COPY of serving.sampler.MIN_BATCH: batch >= 2 keeps ORT results batch-invariant


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        here = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(here, "manifest.json")) as f:
            m = json.load(f)
        self.caches = [(c["input"], c["output"], [int(d) for d in c["shape"][1:]], c["dtype"]) for c in m["caches"]]
        self.inputs = [s["name"] for s in m["inputs"]]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(json.loads(args["model_config"]).get("parameters", {})
                                        .get("intra_op_threads", {}).get("string_value", "1"))
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # float activations, as exported
        self.session = ort.InferenceSession(os.path.join(here, "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.state = {}  # correlation id -> {cache input name: array [1, ...]}

    def execute(self, requests):
        get = pb_utils.get_input_tensor_by_name
        rows = []
        for r in requests:
            cid = int(get(r, "CORRID").as_numpy().reshape(-1)[0])
            start = int(get(r, "START").as_numpy().reshape(-1)[0])
            end = int(get(r, "END").as_numpy().reshape(-1)[0])
            rows.append((cid, start, end, {n: get(r, n).as_numpy() for n in self.inputs}))
        feed = {n: np.concatenate([row[3][n] for row in rows]) for n in self.inputs}
        feed["timestep"] = feed["timestep"].reshape(-1).astype(np.float32)
        feed["start"] = np.array([[row[1]] for row in rows], np.int32)
        for cin, _, dims, dtype in self.caches:
            feed[cin] = np.concatenate([np.zeros([1] + dims, dtype) if row[1] or row[0] not in self.state
                                        else self.state[row[0]][cin] for row in rows])
        n = len(rows)
        if n < MIN_BATCH:  # pad with a copy of row 0 (dropped)
            feed = {k: np.concatenate([v] + [v[:1]] * (MIN_BATCH - n)) for k, v in feed.items()}
        out = dict(zip(self.outputs, self.session.run(None, feed)))
        responses = []
        for i, (cid, _, end, _) in enumerate(rows):
            if end:
                self.state.pop(cid, None)
            else:
                self.state[cid] = {cin: out[cout][i:i + 1].copy() for cin, cout, _, _ in self.caches}
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("noise_pred", out["noise_pred"][i:i + 1])]))
        return responses
