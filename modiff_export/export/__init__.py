"""Step 3 of the pipeline: graphs. Tracing the quantized UNet into prime/step ONNX graphs (trace.py),
the graph passes that store weights as int8/int4 + DequantizeLinear (passes.py), the TensorRT-readiness
check (check.py) and the ONNX Runtime CPU variant (ort_variant.py). The I/O contract they write is
modiff_export/manifest.py."""
