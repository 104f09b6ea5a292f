"""Triton Python-backend model `modiff_unet` (`cli.py package-triton --unet-backend python`): the same
merged prime/step ONNX graph as the onnxruntime variant, run by ONNX Runtime inside the Python backend,
which keeps the MoDiff caches itself per correlation id (the Python backend has no implicit state).

For servers without the onnxruntime backend (e.g. the tritonserver bundled with nvidia-pytriton), and
for tests. Sequence controls: START, END (int32) and CORRID (uint64), strategy `oldest`: the steps of
concurrent sequences arrive together and run as one batch.

Held caches are freed when a sequence ENDs, when its START comes again (superseded: the new trajectory
starts from zeros) and when it has been idle for `sequence_idle_us` (the config's
max_sequence_idle_microseconds: Triton ends the sequence then but does not tell a Python-backend model,
so a sweeper thread drops it). Gauges on Triton's /metrics: modiff_unet_cache_bytes (bytes of caches
held) and modiff_unet_sequences (sequences held).
"""
import json
import os
import threading
import time

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
        # timestep, class_labels: [B] in the graph, [1] per request (config reshape)
        self.flat = {s["name"]: s["dtype"] for s in m["inputs"] if len(s["shape"]) == 1}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(json.loads(args["model_config"]).get("parameters", {})
                                        .get("intra_op_threads", {}).get("string_value", "1"))
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # float activations, as exported
        self.session = ort.InferenceSession(os.path.join(here, "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.state = {}  # correlation id -> {cache input name: array [1, ...]}
        self.seen = {}  # correlation id -> time.monotonic() of its last request
        self.lock = threading.Lock()
        params = json.loads(args["model_config"]).get("parameters", {})
        self.idle_s = int(params.get("sequence_idle_us", {}).get("string_value", "60000000")) / 1e6
        self._gauges(args)
        self.stop = threading.Event()
        self.sweeper = threading.Thread(target=self._sweep_loop, daemon=True)
        self.sweeper.start()

    def _gauges(self, args):
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.families = [pb_utils.MetricFamily(name=n, description=d, kind=pb_utils.MetricFamily.GAUGE) for n, d in
                         (("modiff_unet_cache_bytes", "Bytes of MoDiff caches held for open sequences"),
                          ("modiff_unet_sequences", "Open sequences whose caches are held"))]
        self.g_bytes, self.g_seqs = (f.Metric(labels=labels) for f in self.families)

    def _publish(self):  # under self.lock
        self.g_bytes.set(float(sum(a.nbytes for st in self.state.values() for a in st.values())))
        self.g_seqs.set(float(len(self.state)))

    def _sweep(self, now):
        with self.lock:
            for cid in [c for c, t in self.seen.items() if now - t > self.idle_s]:
                self.state.pop(cid, None)
                self.seen.pop(cid, None)
            self._publish()

    def _sweep_loop(self):
        while not self.stop.wait(min(1.0, max(0.05, self.idle_s / 4))):
            self._sweep(time.monotonic())

    def finalize(self):
        self.stop.set()
        self.sweeper.join(timeout=5)
        del self.g_bytes, self.g_seqs  # metrics before their families (the Python backend insists)
        del self.families

    def execute(self, requests):
        get = pb_utils.get_input_tensor_by_name
        rows = []
        for r in requests:
            cid = int(get(r, "CORRID").as_numpy().reshape(-1)[0])
            start = int(get(r, "START").as_numpy().reshape(-1)[0])
            end = int(get(r, "END").as_numpy().reshape(-1)[0])
            rows.append((cid, start, end, {n: get(r, n).as_numpy() for n in self.inputs}))
        feed = {n: np.concatenate([row[3][n] for row in rows]) for n in self.inputs}
        for name, dtype in self.flat.items():
            feed[name] = feed[name].reshape(-1).astype(dtype)
        feed["start"] = np.array([[row[1]] for row in rows], np.int32)
        with self.lock:
            for cid, start, _, _ in rows:
                if start:  # a new trajectory on this id supersedes whatever it held
                    self.state.pop(cid, None)
            held = {row[0]: self.state.get(row[0]) for row in rows}
        lost = {cid for cid, start, _, _ in rows if not start and held[cid] is None}  # freed by the idle timeout
        for cin, _, dims, dtype in self.caches:
            feed[cin] = np.concatenate([np.zeros([1] + dims, dtype) if held[row[0]] is None
                                        else held[row[0]][cin] for row in rows])
        n = len(rows)
        if n < MIN_BATCH:  # pad with a copy of row 0 (dropped)
            feed = {k: np.concatenate([v] + [v[:1]] * (MIN_BATCH - n)) for k, v in feed.items()}
        out = dict(zip(self.outputs, self.session.run(None, feed)))
        responses, now = [], time.monotonic()
        with self.lock:
            for i, (cid, _, end, _) in enumerate(rows):
                if cid in lost:
                    responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                        f"sequence {cid} has no caches (never started, or idle longer than {self.idle_s:g} s): "
                        "send START again", pb_utils.TritonError.INVALID_ARG)))
                    continue
                if end:
                    self.state.pop(cid, None)
                    self.seen.pop(cid, None)
                else:
                    self.state[cid] = {cin: out[cout][i:i + 1].copy() for cin, cout, _, _ in self.caches}
                    self.seen[cid] = now
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("noise_pred",
                                                                             out["noise_pred"][i:i + 1])]))
            self._publish()
        return responses
