"""ppcompile: a compiler for pipeline-parallel training and inference of PyTorch models.

Kept light on purpose: model files import ``ModelSpec`` from here, and the runtime loads
model files, so importing ``ppcompile`` must not pull in the compiler.
"""

import warnings

# torch warns at import when NumPy is missing; ppcompile never uses NumPy, and user errors must stay one line.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from ppcompile.runtime.spec import ModelSpec  # noqa: E402

__all__ = ["ModelSpec"]
__version__ = "0.1.0"
