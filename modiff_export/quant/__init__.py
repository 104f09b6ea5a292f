"""Step 2 of the pipeline: quantize and calibrate. The MoDiff reference quantizer (quantization.py,
docs/design.md section 1) and static-scale calibration (calibration.py, section 2)."""
