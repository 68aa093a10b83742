"""The policies ACKTR accepts: SB3's actor-critic policies, under SB3's names (as NPG and TRPO)."""

from sb3_trpo.npg.policies import CnnPolicy, MlpPolicy, MultiInputPolicy

__all__ = ["CnnPolicy", "MlpPolicy", "MultiInputPolicy"]
