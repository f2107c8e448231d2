"""Running it: training data, `vramfit train` (model, prediction, trainer, OOM fall-back, outputs),
`accelerate launch` on several GPUs, the MemoryTracker callback, `vramfit calibrate`, `vramfit merge`."""
