"""metaunlearn: make unlearned text-to-image diffusion models resist relearning."""

from .conditioning import Conditioning
from .errors import ConfigError, MetaunlearnError, ModelError
from .model import DiffusionModel

__version__ = "0.1.0"
__all__ = ["Conditioning", "ConfigError", "DiffusionModel", "MetaunlearnError", "ModelError", "__version__"]
