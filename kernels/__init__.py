"""Miles kernels, importable as `miles.kernels` (mapped in setup.py to avoid PyPI's `kernels`).

Each kernel ships with a torch reference that runs on CPU; Triton versions are GPU-only.
"""
