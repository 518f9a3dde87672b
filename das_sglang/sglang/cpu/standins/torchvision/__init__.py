"""CPU development mode stand-in for torchvision (never used on GPU).

``sglang.srt.configs`` imports torchvision at module level for vision models; the PyPI
wheel drags a CUDA torch in, so text-only CPU development uses this placeholder package.
"""

# The stand-ins directory is on sys.path (that is how this package was found).
from _standin import install_submodule_finder, module_getattr
__version__ = "0.0.0+das-sglang-cpu-standin"
install_submodule_finder(__name__)
__getattr__ = module_getattr(__name__)
