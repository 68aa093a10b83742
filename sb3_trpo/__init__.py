"""Trust Region Policy Optimization for Stable-Baselines3."""

from sb3_trpo.acktr import ACKTR
from sb3_trpo.common.validation import NonFiniteError
from sb3_trpo.npg import NPG
from sb3_trpo.trpo import TRPO
from sb3_trpo.trpo_mask import MaskableTRPO
from sb3_trpo.trpo_recurrent import RecurrentTRPO

__version__ = "0.1.0"

__all__ = ["ACKTR", "NPG", "TRPO", "MaskableTRPO", "NonFiniteError", "RecurrentTRPO", "__version__"]
