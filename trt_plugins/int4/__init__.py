"""INT4 (W4A16) weights: reference.py is the definition; kernels.py the Triton kernel."""
