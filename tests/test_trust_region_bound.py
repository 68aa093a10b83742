"""The trust region in training: every accepted update of every algorithm keeps its KL below ``target_kl``.

The KL is measured independently of the package: ``torch.distributions.kl_divergence`` of
the policy after the update against the policy before it, on the update's batch, through
the policies' own API (masks, LSTM states).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import gymnasium as gym
import pytest
import torch as th
from gymnasium.wrappers import FlattenObservation
from sb3_contrib.common.envs import InvalidActionEnvDiscrete, InvalidActionEnvMultiBinary, InvalidActionEnvMultiDiscrete
from stable_baselines3.common.envs import IdentityEnv, IdentityEnvMultiBinary, IdentityEnvMultiDiscrete

import sb3_trpo.common.trust_region_algorithm as trust_region_algorithm
from sb3_trpo import NPG, TRPO, MaskableTRPO, RecurrentTRPO
from sb3_trpo.common.policy_step import ActorStep, PolicyBatch
from sb3_trpo.common.trust_region import flatten
from tests.helpers import SMALL, Reach, RecordedUpdate, learn_recording

FAMILIES: dict[str, Callable[[], gym.Env]] = {
    "box": Reach,
    "discrete": lambda: IdentityEnv(4, ep_length=20),
    # One-hot observations: sb3-contrib's LSTM policies take no MultiDiscrete observations.
    "multidiscrete": lambda: FlattenObservation(IdentityEnvMultiDiscrete(3, ep_length=20)),
    "multibinary": lambda: IdentityEnvMultiBinary(3, ep_length=20),
}
MASKED_FAMILIES: dict[str, Callable[[], gym.Env]] = {
    "discrete": lambda: InvalidActionEnvDiscrete(dim=5, n_invalid_actions=2),
    "multidiscrete": lambda: InvalidActionEnvMultiDiscrete(dims=[3, 4], n_invalid_actions=3),
    "multibinary": lambda: InvalidActionEnvMultiBinary(dims=3, n_invalid_actions=2),
}
LSTM = dict(SMALL, policy="MlpLstmPolicy", policy_kwargs=dict(net_arch=[16], lstm_hidden_size=16))
TRPO_CASES = [
    *[pytest.param(TRPO, dict(SMALL, policy="MlpPolicy"), env, id=f"trpo-{name}") for name, env in FAMILIES.items()],
    *[
        pytest.param(MaskableTRPO, dict(SMALL, policy="MlpPolicy"), env, id=f"maskable-{name}")
        for name, env in MASKED_FAMILIES.items()
    ],
    *[pytest.param(RecurrentTRPO, LSTM, env, id=f"recurrent-{name}") for name, env in FAMILIES.items()],
]
N_UPDATES = 4


def recorded_updates(model: NPG, dense_fisher: bool = False) -> list[RecordedUpdate]:
    updates, _ = learn_recording(model, N_UPDATES * model.n_steps, dense_fisher)
    assert len(updates) == N_UPDATES
    return updates


@pytest.mark.parametrize(("algorithm", "settings", "make_env"), TRPO_CASES)
def test_every_accepted_update_of_a_run_has_kl_below_target_kl(algorithm: type[TRPO], settings: dict, make_env) -> None:
    updates = recorded_updates(algorithm(env=make_env(), **settings))
    accepted = [update for update in updates if update.stats.line_search.success]
    assert len(accepted) >= N_UPDATES - 1
    for update in accepted:
        assert 0 < update.kl < update.target_kl
        # The KL the line search measured (and the logger reports) is this one: direction and weighting.
        assert update.stats.line_search.kl == pytest.approx(update.kl, rel=1e-4, abs=1e-9)
    for update in updates:
        if not update.stats.line_search.success:
            assert not update.step.any(), "a rejected step leaves the actor where it was"


@pytest.mark.parametrize(("algorithm", "settings", "make_env"), TRPO_CASES)
def test_line_search_shrinks_a_too_long_step_to_kl_below_target_kl(
    algorithm: type[TRPO], settings: dict, make_env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each full step three times too long (about nine times the radius in KL), shrunk by 0.9 per try
    # (the KL by about 0.81): tries land between target_kl and 1.5 target_kl, and the bound decides.
    real_max_step_size = trust_region_algorithm.max_step_size
    monkeypatch.setattr(trust_region_algorithm, "max_step_size", lambda *args: 3 * real_max_step_size(*args))
    model = algorithm(env=make_env(), line_search_shrinking_factor=0.9, line_search_max_iter=40, **settings)
    updates = recorded_updates(model)
    accepted = [update for update in updates if update.stats.line_search.success]
    assert len(accepted) >= N_UPDATES - 1
    for update in accepted:
        assert update.stats.line_search.n_backtracks > 0
        assert 0 < update.kl < update.target_kl
        assert update.stats.line_search.kl == pytest.approx(update.kl, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("make_env", FAMILIES.values(), ids=FAMILIES.keys())
def test_npg_full_step_puts_the_dense_quadratic_kl_model_on_target_kl(make_env) -> None:
    """NPG takes the whole step ``s``, scaled so that ``0.5 s^T (F + damping I) s = target_kl`` with ``F`` the dense Fisher."""
    model = NPG("MlpPolicy", make_env(), **SMALL)
    for update in recorded_updates(model, dense_fisher=True):
        assert update.fisher is not None
        assert update.stats.line_search.step_fraction == 1.0
        step = update.step.to(update.fisher.dtype)
        quadratic_kl = 0.5 * float(step @ update.fisher @ step)
        damping_term = 0.5 * model.cg_damping * float(step @ step)
        assert quadratic_kl + damping_term == pytest.approx(update.target_kl, rel=1e-3)
        # The measured KL is the quadratic model's, up to the third-order terms (within 5% here).
        assert update.kl == pytest.approx(quadratic_kl, rel=0.1)
        assert update.stats.line_search.kl == pytest.approx(update.kl, rel=1e-4, abs=1e-9)


def test_kl_is_measured_from_the_new_policy_to_the_old() -> None:
    """The log-std alone moves, by ``d``: per dimension ``KL(new || old) = (e^{2d} - 1 - 2d) / 2``
    and ``KL(old || new) = (e^{-2d} - 1 + 2d) / 2``.

    With steps of 0.3 and 0.1 in the two log-stds the two directions give 0.0609 and 0.0419
    (averaged over the dimensions); a radius of 0.05 between them rejects the full step
    only when the KL is measured from the new policy to the old.
    """
    model = TRPO("MlpPolicy", Reach(), **SMALL)
    log_std_step = th.tensor([0.3, 0.1])
    forward = float(((2 * log_std_step).exp() - 1 - 2 * log_std_step).mean() / 2)
    backward = float(((-2 * log_std_step).exp() - 1 + 2 * log_std_step).mean() / 2)
    model.target_kl = 0.05
    assert backward < model.target_kl < forward

    generator = th.Generator().manual_seed(0)
    obs = 2 * th.rand(32, 2, generator=generator) - 1
    with th.no_grad():
        old_distribution = copy.copy(model.policy.get_distribution(obs))
        actions = old_distribution.sample()
        batch = PolicyBatch(
            observations=obs, actions=actions, old_log_prob=old_distribution.log_prob(actions), advantages=th.randn(32)
        )
    full_step = flatten([log_std_step if p is model.policy.log_std else th.zeros_like(p) for p in model.actor_parameters])
    step = ActorStep(model.actor_parameters, full_step, model._distribution, batch, old_distribution)
    _, kl = step.evaluate(1.0)
    assert kl == pytest.approx(forward, rel=1e-5)
    # The log-std does not depend on the state: every state's KL is the mean KL.
    assert step.largest_state_kl == pytest.approx(forward, rel=1e-5)
    # Every surrogate counts as an improvement here: the KL alone decides, and it rejects the full step.
    result = model._take_step(step.evaluate, step.restore, -math.inf)
    assert result.step_fraction == pytest.approx(model.line_search_shrinking_factor)
    assert result.kl == pytest.approx(float(((1.6 * log_std_step).exp() - 1 - 1.6 * log_std_step).mean() / 2), rel=1e-5)
