"""The memory model: a Setup on a ModelSpec -> the bytes of one training step, walked phase by
phase (walk.py), or replayed allocation by allocation through a model of torch's caching
allocator (events.py, kernels.py, allocator.py, replay.py); the per-GPU terms of several GPUs
(distributed.py).  Pure at import: no torch, no I/O."""
