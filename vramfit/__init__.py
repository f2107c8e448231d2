"""vramfit: will this fine-tuning run fit on my GPU, and what is the best setup that does?

The public functions live in vramfit.api; they are looked up on first use, so `import vramfit`
imports neither torch nor the planner."""

from vramfit.errors import VramfitError

__version__ = "0.1.0"
__all__ = ["VramfitError", "MemoryTracker", "estimate", "estimate_gpus", "find_gpu", "merge", "plan", "plan_gpus",
           "train", "__version__"]
_API = ("estimate", "estimate_gpus", "find_gpu", "merge", "plan", "plan_gpus", "train")


def __getattr__(name):
    if name in _API:
        from vramfit import api

        return getattr(api, name)
    if name == "MemoryTracker":  # without importing transformers at `import vramfit`
        from vramfit.run.tracker import MemoryTracker

        return MemoryTracker
    raise AttributeError(f"module 'vramfit' has no attribute {name!r}")
