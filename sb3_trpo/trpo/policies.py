"""The policies TRPO accepts: those of NPG (SB3's actor-critic policies), as ``sb3_contrib.trpo.policies``."""

from sb3_trpo.npg.policies import CnnPolicy, MlpPolicy, MultiInputPolicy

__all__ = ["CnnPolicy", "MlpPolicy", "MultiInputPolicy"]
