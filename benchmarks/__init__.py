"""Benchmarks of vramfit against real GPUs: `accuracy/` (memory) and `speed/`."""
