"""Natural Policy Gradient: the trust-region step without the line search."""

from __future__ import annotations

from typing import ClassVar

from stable_baselines3.common.policies import BasePolicy

from sb3_trpo.common.policy_step import Restore, StepEvaluation
from sb3_trpo.common.trust_region import LineSearchResult, full_step
from sb3_trpo.common.trust_region_algorithm import TrustRegionAlgorithm
from sb3_trpo.npg.policies import CnnPolicy, MlpPolicy, MultiInputPolicy


class NPG(TrustRegionAlgorithm):
    """
    Natural Policy Gradient (NPG) with a separately fitted critic.

    Each update solves ``F s = g`` by conjugate gradient (``F`` the Fisher information
    of the policy, ``g`` the gradient of the importance-sampled surrogate), and moves
    the actor by ``sqrt(2 target_kl / s^T F s) * s``: the step that reaches the
    trust-region boundary of the quadratic KL model. Only a step whose surrogate or KL is
    not finite is refused. :class:`sb3_trpo.TRPO` adds a backtracking line search.

    The KL that is measured and logged (``train/accepted_kl``) is ``KL(pi_new || pi_old)``,
    averaged over samples (and over action dimensions for Gaussians and Bernoullis), as
    sb3-contrib measures it; its Hessian at the old policy is the same Fisher matrix as that
    of the paper's ``KL(pi_old || pi_new)``.

    Papers: Kakade, "A Natural Policy Gradient" (2001); Schulman et al., TRPO (2015).

    :param policy: The policy model to use (MlpPolicy, CnnPolicy, ...)
    :param env: The environment to learn from (if registered in Gym, can be str)
    :param learning_rate: The learning rate for the value function, it can be a function
        of the current progress remaining (from 1 to 0)
    :param n_steps: The number of steps to run for each environment per update
        (i.e. rollout buffer size is n_steps * n_envs where n_envs is number of environment copies running in parallel)
    :param batch_size: Minibatch size for the value function
    :param gamma: Discount factor, in (0, 1]
    :param cg_max_steps: maximum number of steps in the Conjugate Gradient algorithm
        for computing the Hessian vector product
    :param cg_damping: damping in the Hessian vector product computation
    :param n_critic_updates: number of critic updates (epochs over the rollout) per policy update
    :param gae_lambda: Factor for trade-off of bias vs variance for Generalized Advantage Estimator, in [0, 1]
    :param use_sde: Whether to use generalized State Dependent Exploration (gSDE)
        instead of action noise exploration (default: False)
    :param sde_sample_freq: Sample a new noise matrix every n steps when using gSDE
        Default: -1 (only sample at the beginning of the rollout)
    :param rollout_buffer_class: Rollout buffer class to use. If ``None``, it will be automatically selected.
    :param rollout_buffer_kwargs: Keyword arguments to pass to the rollout buffer on creation
    :param normalize_advantage: Whether to normalize or not the advantage
    :param target_kl: Target Kullback-Leibler divergence between updates (the trust-region radius delta).
        Should be small for stability. Values like 0.01, 0.05. It can be a function of the current
        progress remaining (from 1 to 0), as ``learning_rate``, that is > 0 at progress 1 and 0
    :param sub_sampling_factor: Sub-sample the batch to make computation faster
        see p40-42 of John Schulman thesis http://joschu.net/docs/thesis.pdf
    :param stats_window_size: Window size for the rollout logging, specifying the number of episodes to average
        the reported success rate, mean episode length, and mean reward over
    :param tensorboard_log: the log location for tensorboard (if None, no logging)
    :param policy_kwargs: additional arguments to be passed to the policy on creation
    :param verbose: the verbosity level: 0 no output, 1 info, 2 debug
    :param seed: Seed for the pseudo random generators
    :param device: Device (cpu, cuda, ...) on which the code should be run.
        Setting it to auto, the code will be run on the GPU if possible.
    :param fisher_vector_product: how the Fisher-vector product is computed: ``"analytic"``
        (Jacobian-vector product through the distribution parameters, their closed-form
        Fisher, and a vector-Jacobian product back; double backprop for distributions
        without a closed form) or ``"double_backprop"`` (Hessian-vector product of the mean
        KL, as sb3-contrib does). Both give the same product.
    :param cg_residual_tol: conjugate gradient stops once the squared residual norm is below this
    :param background_critic_fit: fit the critic in a forked worker process while the next
        rollout is collected, at the lowest CPU priority (``SCHED_IDLE``: on CPU time no other
        process wants); a fit the worker has not finished when the rollout ends is finished in
        the training process. The numbers are those of the fit in the training process; the
        value loss of an update is logged with the next one. ``"auto"`` (the default) does so
        on Linux, on the CPU, with Adam/AdamW and at least two CPUs in the process's affinity,
        for each fit whose previous rollout left at least half a CPU idle (``/proc/stat``; see
        :class:`~sb3_trpo.common.critic_fitter.CriticFitter`): trainings that keep the CPUs busy never
        start a worker. ``True`` always uses it (a ``ValueError`` where it cannot run; a model
        loaded where it cannot run fits in the training process, with a warning), ``False``
        never. The worker moves the policy's weights and the critic's Adam state to shared
        memory; its own memory cost is given in :ref:`background-critic-fit`.
    :param _init_setup_model: Whether or not to build the network at the creation of the instance
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": MlpPolicy,
        "CnnPolicy": CnnPolicy,
        "MultiInputPolicy": MultiInputPolicy,
    }

    def _take_step(self, evaluate: StepEvaluation, restore: Restore, objective_before: float) -> LineSearchResult:
        return full_step(evaluate, restore, objective_before)
