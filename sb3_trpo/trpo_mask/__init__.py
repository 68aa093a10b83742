from sb3_trpo.trpo_mask.policies import CnnPolicy, MlpPolicy, MultiInputPolicy
from sb3_trpo.trpo_mask.trpo_mask import MaskableTRPO

__all__ = ["CnnPolicy", "MaskableTRPO", "MlpPolicy", "MultiInputPolicy"]
