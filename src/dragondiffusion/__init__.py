"""DragonDiffusion and DiffEditor: drag-style editing of real images with a diffusion model."""

__version__ = "0.1.0.dev0"

from .errors import InputError
from .models import load

__all__ = ["InputError", "__version__", "load"]
