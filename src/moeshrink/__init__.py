"""moeshrink: shrink sparse Mixture-of-Experts language models after training."""

from moeshrink.runtime import limit_openmp_spinning

limit_openmp_spinning()  # before anything imports torch: see moeshrink.runtime

from importlib.metadata import PackageNotFoundError, version  # noqa: E402

try:
    __version__ = version("moeshrink")  # declared once, in pyproject.toml
except PackageNotFoundError:  # run from a source tree that was not installed
    __version__ = "0+unknown"

from moeshrink.errors import MoeShrinkError  # noqa: E402
from moeshrink.info import inspect_model as inspect  # noqa: E402
from moeshrink.pipeline import apply_plan, prune  # noqa: E402

__all__ = ["MoeShrinkError", "__version__", "apply_plan", "inspect", "prune"]
