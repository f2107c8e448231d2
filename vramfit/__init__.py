"""vramfit: will this fine-tuning run fit on my GPU, and what is the best setup that does?"""

from vramfit.errors import VramfitError

__version__ = "0.1.0"
__all__ = ["VramfitError", "estimate", "estimate_gpus", "plan", "plan_gpus", "__version__"]


def estimate(*args, **kwargs):
    """Predict the memory of one fine-tuning step; see `vramfit.api.estimate`."""
    from vramfit.api import estimate as _estimate

    return _estimate(*args, **kwargs)


def plan(*args, **kwargs):
    """The best setup of a model that fits a GPU; see `vramfit.planner.plan`."""
    from vramfit.planner import plan as _plan

    return _plan(*args, **kwargs)


def estimate_gpus(*args, **kwargs):
    """Per-GPU memory on N GPUs with a strategy (ddp, fsdp-full, zero3, ...); see `vramfit.multigpu.estimate_gpus`."""
    from vramfit.multigpu import estimate_gpus as _estimate_gpus

    return _estimate_gpus(*args, **kwargs)


def plan_gpus(*args, **kwargs):
    """The best strategy and setup on several GPUs; see `vramfit.multigpu.plan_gpus`."""
    from vramfit.multigpu import plan_gpus as _plan_gpus

    return _plan_gpus(*args, **kwargs)


def __getattr__(name):
    """`vramfit.MemoryTracker` without importing transformers at `import vramfit`."""
    if name == "MemoryTracker":
        from vramfit.tracker import MemoryTracker

        return MemoryTracker
    raise AttributeError(f"module 'vramfit' has no attribute {name!r}")
