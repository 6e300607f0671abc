"""Real W4A4 kernels: fused online transform + activation quantization, and 8-bit GEMMs
over 4-bit stored weights (Hopper has no INT4 tensor-core MMA; see `docs/hopper-kernels.md`).

Entry points live in `duquant.kernels.ops`; pure-PyTorch references in
`duquant.kernels.reference`. Triton is imported lazily, only when a CUDA tensor arrives,
so this package imports and runs (through the references) on a CPU-only machine.
"""
