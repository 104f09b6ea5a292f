"""Step 7 of the pipeline: evaluation. Quality metrics on digits (metrics.py) and the BOPs / bytes cost
model (cost.py)."""
