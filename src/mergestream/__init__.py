"""mergestream: continual model merging in constant memory.

Fold fine-tuned checkpoints into one merged model as they arrive (OPCM and its baselines), with a
resumable on-disk state and memory that does not grow with the number or size of models.
"""

__version__ = "0.1.0"

from .errors import CheckpointError, ConfigError, MergestreamError, StateError  # noqa: E402
from .methods import METHODS, OPCM, ContinualMethod, get_method  # noqa: E402
from .state import MergeState, merge  # noqa: E402

__all__ = [
    "METHODS",
    "OPCM",
    "CheckpointError",
    "ConfigError",
    "ContinualMethod",
    "MergeState",
    "MergestreamError",
    "StateError",
    "__version__",
    "get_method",
    "merge",
]
