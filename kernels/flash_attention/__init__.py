"""Blockwise (flash) attention: reference, custom_vjp wiring, backends.

reference.py   dense f32 reference (the oracle; imports no backend)
vjp.py         custom_vjp, padding, BlockSizes, the backend kernel contract
xla_chunked.py the blockwise kernels' tile loops in plain XLA ops
pallas_tpu.py  Mosaic TPU kernels (also run by the interpreter on CPU)
pallas_gpu.py  Pallas GPU kernels (optional, imported lazily)
pallas_mgpu.py Mosaic GPU (Hopper) kernels, called by pallas_gpu.py
tiles.py       tile products, round-up, power-of-two tiles, soft cap
"""
