"""moeshrink: shrink sparse Mixture-of-Experts language models after training."""

__version__ = "0.1.0"

from moeshrink.errors import MoeShrinkError  # noqa: E402
from moeshrink.info import inspect_model as inspect  # noqa: E402
from moeshrink.pipeline import apply_plan, prune  # noqa: E402

__all__ = ["MoeShrinkError", "__version__", "apply_plan", "inspect", "prune"]
