"""Model files package-triton copies into a Triton model repository (run by Triton's Python backend, not
imported here)."""
