"""Trust Region Policy Optimization for Stable-Baselines3."""

from sb3_trpo.maskable import MaskableTRPO
from sb3_trpo.npg import NPG, NonFiniteError
from sb3_trpo.recurrent import RecurrentTRPO
from sb3_trpo.trpo import TRPO

__version__ = "0.1.0"

__all__ = ["NPG", "TRPO", "MaskableTRPO", "NonFiniteError", "RecurrentTRPO", "__version__"]
