"""Step 2 of the pipeline: the quantization math (docs/design.md section 1). The MoDiff reference layers
(quantization.py), the static scale table and its timestep buckets (scales.py), scale searches
(search.py) and GPTQ's column algorithm (gptq.py). Imports nothing but config and errors; workflows that
run trajectories live in calibration/."""
