"""metaunlearn: make unlearned text-to-image diffusion models resist relearning."""

import logging as _logging

# diffusers imports CLIP's image processor (for the SD safety checker, which we
# never load); without torchvision, transformers says so on every start.
_logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision" not in record.getMessage())

from .conditioning import Conditioning  # noqa: E402
from .errors import ConfigError, MetaunlearnError, ModelError  # noqa: E402
from .model import DiffusionModel  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Conditioning", "ConfigError", "DiffusionModel", "MetaunlearnError", "ModelError", "__version__"]
