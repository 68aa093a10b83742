"""One ``train()`` from identical weights and rollout equals sb3-contrib's TRPO step."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import sb3_contrib
import torch as th
from stable_baselines3.common.logger import configure

from sb3_trpo import TRPO
from tests.helpers import actor_vector, critic_vector, parameter_vector

SETTINGS = dict(n_steps=256, batch_size=64, n_critic_updates=3, cg_max_steps=15, target_kl=0.01, seed=3)


def actor_steps(env_id: str, fisher: str, **overrides: object) -> tuple[th.Tensor, th.Tensor, TRPO]:
    settings = {**SETTINGS, **overrides}
    reference = sb3_contrib.TRPO("MlpPolicy", env_id, **settings)
    ours = TRPO("MlpPolicy", env_id, fisher_vector_product=fisher, **settings)
    ours.policy.load_state_dict(reference.policy.state_dict())
    # Move away from the initial weights, so that the checked update is a typical one.
    reference.learn(2 * settings["n_steps"])
    ours.policy.load_state_dict(reference.policy.state_dict())
    # A deep copy: Optimizer.load_state_dict would share the moment tensors otherwise.
    ours.policy.optimizer.load_state_dict(copy.deepcopy(reference.policy.optimizer.state_dict()))
    reference._last_obs = reference.env.reset()
    reference.collect_rollouts(reference.env, _NoCallback(), reference.rollout_buffer, reference.n_steps)
    ours.rollout_buffer = copy.deepcopy(reference.rollout_buffer)
    ours.set_logger(configure(None, []))

    names = [n for n, p in ours.policy.named_parameters() if any(p is a for a in ours.actor_parameters)]
    critic_names = [n for n, p in ours.policy.named_parameters() if any(p is c for c in ours.critic_parameters)]
    reference_params = dict(reference.policy.named_parameters())
    before = actor_vector(ours)
    np.random.seed(0)
    reference.train()
    np.random.seed(0)
    ours.train()
    ours.finish_critic_fit()  # the critic fit may run in the background (the default): train() only started it
    reference_step = parameter_vector(reference_params[n] for n in names) - before
    our_step = actor_vector(ours) - before
    critic_gap = parameter_vector(reference_params[n] for n in critic_names) - critic_vector(ours)
    assert float(critic_gap.abs().max()) < 1e-5, "the critic fit must equal sb3-contrib's too"
    return reference_step, our_step, ours


class _NoCallback:
    def __getattr__(self, name: str):
        return lambda *args, **kwargs: True


@pytest.mark.parametrize("fisher", ["analytic", "double_backprop"])
@pytest.mark.parametrize(
    ("env_id", "overrides"),
    [
        ("Pendulum-v1", {}),
        ("CartPole-v1", {}),
        ("Pendulum-v1", {"sub_sampling_factor": 4}),
        ("CartPole-v1", {"sub_sampling_factor": 2, "normalize_advantage": False}),
    ],
)
def test_actor_step_matches_sb3_contrib(env_id: str, overrides: dict, fisher: str) -> None:
    reference_step, our_step, ours = actor_steps(env_id, fisher, **overrides)
    assert float(reference_step.norm()) > 1e-4, "the reference update must move the actor"
    relative_error = float((our_step - reference_step).norm() / reference_step.norm())
    print(f"{env_id} {overrides} {fisher}: relative error {relative_error:.2e}")
    # About ten times the largest error of these cases (`pytest -s` prints them): float32 rounding
    # of two computations of the same step passes, a different step does not.
    assert relative_error < 3e-4
    # The critic is not part of the actor step, and the actor list is exactly what sb3-contrib moves.
    assert len(ours.actor_parameters) + len(ours.critic_parameters) == len(list(ours.policy.parameters()))
