"""ppcompile: a compiler for pipeline-parallel training and inference of PyTorch models.

Kept light on purpose: model files import ``ModelSpec`` from here, and the runtime loads
model files, so importing ``ppcompile`` must not pull in the compiler.
"""

from ppcompile.runtime.spec import ModelSpec

__all__ = ["ModelSpec"]
__version__ = "0.1.0"
