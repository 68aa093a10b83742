from sb3_trpo.acktr.acktr import ACKTR
from sb3_trpo.acktr.policies import CnnPolicy, MlpPolicy, MultiInputPolicy

__all__ = ["ACKTR", "CnnPolicy", "MlpPolicy", "MultiInputPolicy"]
