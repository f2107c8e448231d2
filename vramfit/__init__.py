"""vramfit: will this fine-tuning run fit on my GPU, and what is the best setup that does?"""

from vramfit.errors import VramfitError

__version__ = "0.1.0"
__all__ = ["VramfitError", "__version__"]
