"""Step 7 of the pipeline: everything that runs trajectories to choose scales or weights (docs/design.md
section 2): observing deltas (observe.py), GPTQ Hessians and rounding (hessians.py), the recommended recipe
(recipe.py) and the calibration file (file.py). The math they use is quant/."""
