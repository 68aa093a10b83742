"""Which rollouts the batched loop may collect: those where it provably computes what SB3's loop computes.

The batched loop (:mod:`sb3_trpo.common.rollout`) computes the values and log-probabilities of
a rollout in one pass over all its steps, and draws the actions with
:mod:`sb3_trpo.common.exact_sampler`. That equals SB3's per-step computation only for a
policy that computes what SB3's ``ActorCriticPolicy`` computes, one observation independently
of the others, and for SB3's own buffers; :func:`batched_rollout_sampler` recognises them, and
everything else runs SB3's own ``OnPolicyAlgorithm.collect_rollouts``.
"""

from __future__ import annotations

from stable_baselines3.common.buffers import DictRolloutBuffer, RolloutBuffer
from stable_baselines3.common.distributions import (
    BernoulliDistribution,
    CategoricalDistribution,
    DiagGaussianDistribution,
    MultiCategoricalDistribution,
    StateDependentNoiseDistribution,
)
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.torch_layers import CombinedExtractor, FlattenExtractor, MlpExtractor, NatureCNN
from torch import nn

from sb3_trpo.common.exact_sampler import (
    ActionSampler,
    action_sampler,
    no_global_hooks,
    runs_only_forward,
    torch_internals_present,
)

# The methods through which SB3's rollout and our batched pass run the policy: an override of
# any of them computes something the batched pass cannot be proven to compute.
POLICY_METHODS = (
    "forward",
    "extract_features",
    "predict_values",
    "get_distribution",
    "_get_action_dist_from_latent",
    "evaluate_actions",
)
KNOWN_DISTRIBUTIONS = (
    DiagGaussianDistribution,
    StateDependentNoiseDistribution,
    CategoricalDistribution,
    MultiCategoricalDistribution,
    BernoulliDistribution,
)
# Modules whose forward is SB3's or torch's own, computes each observation of a batch on its
# own (a batch of many rounds as a batch of one, up to float rounding), keeps no state, draws
# no random numbers and computes the same in training and evaluation mode. BatchNorm and
# Dropout are not among them: their policies run SB3's loop.
KNOWN_MODULES = frozenset(
    {
        FlattenExtractor,
        NatureCNN,
        CombinedExtractor,
        MlpExtractor,
        nn.Sequential,
        nn.ModuleDict,
        nn.Flatten,
        nn.Identity,
        nn.Linear,
        nn.Conv2d,
        nn.Tanh,
        nn.ReLU,
        nn.LeakyReLU,
        nn.ELU,
        nn.SELU,
        nn.CELU,
        nn.GELU,
        nn.SiLU,
        nn.Mish,
        nn.Sigmoid,
        nn.Softplus,
        nn.Softsign,
        nn.Hardtanh,
        nn.ReLU6,
    }
)
# The local variables of SB3's loop that the batched loop gives the callbacks (``self.locals``);
# a SB3 whose loop has others runs its own loop.
SB3_ROLLOUT_LOCALS = frozenset(
    {
        "self",
        "env",
        "callback",
        "rollout_buffer",
        "n_rollout_steps",
        "n_steps",
        "obs_tensor",
        "actions",
        "values",
        "log_probs",
        "clipped_actions",
        "new_obs",
        "rewards",
        "dones",
        "infos",
        "idx",
        "done",
        "terminal_obs",
        "terminal_value",
    }
)


def sb3_rollout_locals() -> frozenset[str]:
    """The names of the local variables of SB3's ``OnPolicyAlgorithm.collect_rollouts``, read from its code."""
    code = OnPolicyAlgorithm.collect_rollouts.__code__
    return frozenset(code.co_varnames + code.co_cellvars)


def recognised_policy(policy: BasePolicy) -> bool:
    """Whether ``policy`` is SB3's ``ActorCriticPolicy`` computation exactly.

    That is: none of :data:`POLICY_METHODS` overridden, a distribution of
    :data:`KNOWN_DISTRIBUTIONS`, every submodule of a type in :data:`KNOWN_MODULES`, and no
    hook (forward, backward, global) or ``compile()`` anywhere in the module tree (read through
    torch's private attributes: a torch without them recognises nothing).
    """
    cls = type(policy)
    return (
        isinstance(policy, ActorCriticPolicy)
        and all(getattr(cls, name) is getattr(ActorCriticPolicy, name) for name in POLICY_METHODS)
        and type(policy.action_dist) in KNOWN_DISTRIBUTIONS
        and all(type(module) in KNOWN_MODULES for module in policy.modules() if module is not policy)
        and torch_internals_present()
        and all(runs_only_forward(module) for module in policy.modules())
        and no_global_hooks()
    )


def batched_rollout_sampler(policy: BasePolicy, buffer: RolloutBuffer) -> ActionSampler | None:
    """The per-step action sampler of the batched loop, or None where SB3's loop must run.

    The batched loop needs a :func:`recognised_policy`, SB3's own ``RolloutBuffer`` or
    ``DictRolloutBuffer`` (their ``add`` and ``compute_returns_and_advantage``), and SB3's
    loop to have the local variables it gives the callbacks (:data:`SB3_ROLLOUT_LOCALS`).
    """
    if type(buffer) not in (RolloutBuffer, DictRolloutBuffer) or sb3_rollout_locals() != SB3_ROLLOUT_LOCALS:
        return None
    if not recognised_policy(policy):
        return None
    return action_sampler(policy)  # type: ignore[arg-type]
