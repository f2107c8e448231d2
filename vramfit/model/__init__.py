"""What the model is: config -> ModelSpec (an exact census on the meta device), the saved tensors
of a traced forward, the CUDA behaviour emulated for those traces, and their on-disk cache.
Torch and transformers are imported inside the functions that need them."""
