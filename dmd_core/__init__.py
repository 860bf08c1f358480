"""dmd_core: the algorithm of Distribution Matching Distillation (denoisers, solvers, losses, shard I/O).

No Prefect and no stage code here.
"""

from .denoisers import Denoiser, EDMDenoiser, Parametrization, VPDenoiser
from .errors import InputError
from .loading import load_denoiser, save_denoiser

__all__ = ["Denoiser", "EDMDenoiser", "VPDenoiser", "Parametrization", "InputError", "load_denoiser", "save_denoiser"]
__version__ = "0.1.0"
