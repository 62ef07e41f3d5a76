"""GPU kernels and their torch references. Knows tensors only: never requests, adapters or files."""
