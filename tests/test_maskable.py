"""MaskableTRPO: masks reach the trust-region step, masked actions are never taken, and it learns."""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from sb3_contrib import MaskablePPO
from sb3_contrib.common.envs import InvalidActionEnvDiscrete, InvalidActionEnvMultiBinary, InvalidActionEnvMultiDiscrete
from sb3_contrib.common.maskable.callbacks import MaskableEvalCallback
from sb3_contrib.common.maskable.evaluation import evaluate_policy
from sb3_contrib.common.maskable.utils import get_action_masks
from sb3_contrib.common.wrappers import ActionMasker
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.envs import IdentityEnv

from sb3_trpo import MaskableTRPO
from sb3_trpo.common.distributions import masked_categorical_kl
from sb3_trpo.common.policy_step import batch_fisher_vector_product, batch_kl
from sb3_trpo.trpo_mask.trpo_mask import MaskablePolicyBatch
from tests.helpers import dense_hessian, recording_logger, tiny_double_model

ENVS = {
    "discrete": lambda: InvalidActionEnvDiscrete(dim=5, n_invalid_actions=2),
    "multidiscrete": lambda: InvalidActionEnvMultiDiscrete(dims=[3, 4], n_invalid_actions=3),
    "multibinary": lambda: InvalidActionEnvMultiBinary(dims=3, n_invalid_actions=2),
}


def sub_space_sizes(action_space: spaces.Space) -> list[int]:
    if isinstance(action_space, spaces.Discrete):
        return [int(action_space.n)]
    if isinstance(action_space, spaces.MultiDiscrete):
        return [int(n) for n in action_space.nvec]
    assert isinstance(action_space, spaces.MultiBinary)
    return [2] * int(action_space.n)


def random_masks(sizes: list[int], n: int, generator: th.Generator) -> th.Tensor:
    """Random masks with at least one valid action per sub-space, and some masked entries."""
    parts = []
    for size in sizes:
        mask = th.rand(n, size, generator=generator) < 0.6
        keep = th.randint(0, size, (n,), generator=generator)
        mask[th.arange(n), keep] = True
        parts.append(mask)
    return th.cat(parts, dim=1)


def masked_batch(model: MaskableTRPO, n: int = 6, seed: int = 1) -> MaskablePolicyBatch:
    generator = th.Generator().manual_seed(seed)
    model.observation_space.seed(seed)
    observations = th.as_tensor(np.stack([model.observation_space.sample() for _ in range(n)]))
    masks = random_masks(sub_space_sizes(model.action_space), n, generator)
    with th.no_grad():
        distribution = model.policy.get_distribution(observations, action_masks=masks)
        actions = distribution.sample()
        old_log_prob = distribution.log_prob(actions)
    advantages = th.randn(n, generator=generator, dtype=th.float64)
    return MaskablePolicyBatch(
        observations=observations, actions=actions, old_log_prob=old_log_prob, advantages=advantages, action_masks=masks
    )


def reference_kl(model: MaskableTRPO, batch: MaskablePolicyBatch, masked: bool = True):
    """``KL(pi_old || pi)`` of the categoricals renormalised over the valid actions only, row by row."""
    sizes = sub_space_sizes(model.action_space)

    def logits_of(distribution) -> list[th.Tensor]:
        categoricals = getattr(distribution, "distributions", None) or [distribution.distribution]
        return [categorical.logits for categorical in categoricals]

    with th.no_grad():
        old_logits = logits_of(copy.copy(model.policy.get_distribution(batch.observations)))
    masks = th.split(batch.action_masks, sizes, dim=1)

    def kl(new_distribution) -> th.Tensor:
        total = th.zeros((), dtype=th.float64)
        for old, new, mask in zip(old_logits, logits_of(new_distribution), masks, strict=True):
            for row in range(len(mask)):
                valid = mask[row] if masked else th.ones_like(mask[row])
                old_log_p = th.log_softmax(old[row][valid], dim=-1)
                new_log_p = th.log_softmax(new[row][valid], dim=-1)
                total = total + (old_log_p.exp() * (old_log_p - new_log_p)).sum()
        return total / len(batch.advantages)

    return kl


@pytest.mark.parametrize("kind", sorted(ENVS))
@pytest.mark.parametrize("method", ["analytic", "double_backprop"])
def test_masked_fisher_vector_product_equals_dense_kl_hessian(kind: str, method: str) -> None:
    model = tiny_double_model(MaskableTRPO, ENVS[kind](), method)
    batch = masked_batch(model)

    def hessian_of(kl) -> th.Tensor:
        return dense_hessian(
            model.policy, model.actor_parameters, lambda: kl(model.policy.get_distribution(batch.observations))
        )

    hessian = hessian_of(reference_kl(model, batch))
    unmasked_hessian = hessian_of(reference_kl(model, batch, masked=False))

    with th.no_grad():
        old = copy.copy(model._distribution(batch))
    product = batch_fisher_vector_product(method, model._distribution(batch), old, batch, model.actor_parameters)
    generator = th.Generator().manual_seed(7)
    for _ in range(3):
        v = th.randn(hessian.shape[0], generator=generator, dtype=th.float64)
        expected = hessian @ v
        assert th.allclose(product(v), expected, rtol=1e-7, atol=1e-10)
        # Ignoring the masks would give a clearly different product: the check has teeth.
        assert float((unmasked_hessian @ v - expected).norm()) > 0.05 * float(expected.norm())


@pytest.mark.parametrize("kind", sorted(ENVS))
def test_masked_kl_equals_kl_over_valid_actions(kind: str) -> None:
    model = tiny_double_model(MaskableTRPO, ENVS[kind]())
    batch = masked_batch(model)
    kl = reference_kl(model, batch)
    with th.no_grad():
        old = copy.copy(model._distribution(batch))
        for param in model.actor_parameters:
            param.add_(0.3 * th.randn_like(param))
        new = model._distribution(batch)
        per_sample = masked_categorical_kl(old, new)
        mean_kl = float(batch_kl(old, new, batch).mean)
        # The policy returns the same distribution object, re-parametrised: read `new` before this.
        expected = float(kl(model.policy.get_distribution(batch.observations)))
    assert expected > 1e-3
    assert mean_kl == pytest.approx(expected, rel=1e-9)
    assert per_sample.shape == (len(batch.advantages),)


class CountViolations(gym.Wrapper):
    """Counts actions that the environment's mask, read just before the step, rules out."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.sizes = sub_space_sizes(env.action_space)
        self.offsets = np.cumsum([0, *self.sizes[:-1]])
        self.violations = 0
        self.steps = 0

    def step(self, action):
        masks = np.asarray(self.env.get_wrapper_attr("action_masks")(), dtype=bool)
        chosen = masks[np.asarray(action, dtype=int).reshape(-1) + self.offsets]
        self.violations += int((~chosen).sum())
        self.steps += 1
        return self.env.step(action)


@pytest.mark.parametrize(
    "make_env",
    [
        lambda: InvalidActionEnvDiscrete(dim=10, n_invalid_actions=8),
        lambda: InvalidActionEnvMultiDiscrete(dims=[4, 5], n_invalid_actions=6),
        lambda: InvalidActionEnvMultiBinary(dims=4, n_invalid_actions=3),
    ],
    ids=["discrete", "multidiscrete", "multibinary"],
)
def test_masked_action_is_never_sampled_during_training(make_env) -> None:
    env = CountViolations(make_env())
    model = MaskableTRPO("MlpPolicy", env, n_steps=128, target_kl=0.05, seed=0)
    model.learn(1024)
    assert env.steps == 1024
    assert env.violations == 0
    # Stored masks and actions agree too: the trust-region step sees the masks the agent acted under.
    buffer = model.rollout_buffer
    actions = buffer.actions.reshape(-1, len(env.sizes)).astype(int)
    stored = buffer.action_masks.reshape(len(actions), -1) > 0.5
    assert stored[np.arange(len(actions))[:, None], actions + env.offsets].all()
    assert (~stored).any()
    # Without masks the same training takes ruled-out actions all the time: the count has teeth.
    model.learn(256, use_masking=False)
    assert env.violations > 50
    assert (model.rollout_buffer.action_masks == 1).all()


def test_predict_never_returns_masked_action() -> None:
    env = InvalidActionEnvDiscrete(dim=6, n_invalid_actions=4)
    model = MaskableTRPO("MlpPolicy", env, n_steps=16, seed=0)
    with th.no_grad():
        model.policy.action_net.bias.copy_(th.tensor([20.0, 0, 0, 0, 0, 0]))
    obs, _ = env.reset(seed=0)
    unmasked = [int(model.predict(obs)[0]) for _ in range(50)]
    assert unmasked.count(0) == 50, "the biased policy prefers action 0"
    rng = np.random.default_rng(0)
    for deterministic in (False, True):
        for _ in range(200):
            masks = rng.random(6) < 0.5
            masks[0] = False
            masks[rng.integers(1, 6)] = True
            action, _ = model.predict(obs, deterministic=deterministic, action_masks=masks)
            assert masks[int(action)]


def test_evaluate_policy_and_eval_callback_apply_masks() -> None:
    # Only the correct action is valid: under masks any policy scores the full 100 per episode.
    make_env = lambda: InvalidActionEnvDiscrete(dim=20, n_invalid_actions=19)  # noqa: E731
    model = MaskableTRPO("MlpPolicy", make_env(), n_steps=64, seed=0)
    eval_callback = MaskableEvalCallback(make_env(), n_eval_episodes=2, eval_freq=64, warn=False)
    model.learn(128, callback=eval_callback)
    assert eval_callback.last_mean_reward == 100.0
    masked, _ = evaluate_policy(model, make_env(), n_eval_episodes=2, warn=False)
    unmasked, _ = evaluate_policy(model, make_env(), n_eval_episodes=2, use_masking=False, warn=False)
    assert masked == 100.0
    assert unmasked < 30.0


class ParityEnv(gym.Env):
    """Observation in {0, 1}; the mask allows only actions of the same parity, action == obs pays."""

    observation_space = spaces.Discrete(2)
    action_space = spaces.Discrete(4)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.state = int(self.np_random.integers(2))
        self.t = 0
        return self.state, {}

    def step(self, action):
        reward = float(action == self.state)
        self.state = int(self.np_random.integers(2))
        self.t += 1
        return self.state, reward, False, self.t >= 20, {}


def test_action_masker_wrapper_supplies_masks() -> None:
    env = CountViolations(ActionMasker(ParityEnv(), lambda e: np.arange(4) % 2 == e.unwrapped.state))
    model = MaskableTRPO("MlpPolicy", env, n_steps=64, seed=0)
    model.learn(256)
    assert env.steps == 256 and env.violations == 0
    assert get_action_masks(model.get_env()).shape == (1, 4)


def test_save_load_round_trip(tmp_path) -> None:
    env = InvalidActionEnvMultiDiscrete(dims=[3, 3], n_invalid_actions=2)
    model = MaskableTRPO("MlpPolicy", env, n_steps=32, target_kl=0.02, cg_max_steps=7, line_search_max_iter=4, seed=0)
    model.learn(64)
    model.save(tmp_path / "model")
    loaded = MaskableTRPO.load(tmp_path / "model", env=env)
    assert (loaded.target_kl, loaded.cg_max_steps, loaded.line_search_max_iter) == (0.02, 7, 4)
    obs = np.stack([env.observation_space.sample() for _ in range(8)])
    masks = np.ones((8, 6), dtype=bool)
    masks[:, 0] = False
    for a, b in zip(model.policy.parameters(), loaded.policy.parameters(), strict=True):
        assert th.equal(a, b)
    expected, _ = model.predict(obs, deterministic=True, action_masks=masks)
    actual, _ = loaded.predict(obs, deterministic=True, action_masks=masks)
    assert np.array_equal(expected, actual) and (actual[:, 0] != 0).all()
    assert len(loaded.actor_parameters) + len(loaded.critic_parameters) == len(list(loaded.policy.parameters()))
    loaded.learn(64)
    assert loaded.num_timesteps == 64


def test_logger_records_trust_region_diagnostics() -> None:
    model = MaskableTRPO("MlpPolicy", InvalidActionEnvDiscrete(dim=8, n_invalid_actions=3), n_steps=128, seed=0)
    logger = recording_logger(model)
    model.learn(256)
    logged = logger.latest
    for key in ("train/accepted_kl", "train/cg_residual", "train/expected_improvement", "train/entropy", "train/value_loss"):
        assert key in logged
    assert logged["train/is_line_search_success"] == 1.0
    assert 0.0 < logged["train/accepted_kl"] < model.target_kl
    # Entropy of the masked policy: at most log(5 valid actions), well below log(8).
    assert logged["train/entropy"] <= np.log(5) + 1e-6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(env=IdentityEnv(space=spaces.Box(-1, 1, (2,)))), "action space Box"),
        (dict(use_sde=True), "use_sde"),
        (dict(target_kl=0.0), "target_kl"),
        (dict(line_search_shrinking_factor=1.5), "line_search_shrinking_factor"),
        (dict(fisher_vector_product="exact"), "fisher_vector_product"),
        (dict(rollout_buffer_class=RolloutBuffer), "rollout_buffer_class"),
    ],
)
def test_invalid_settings_raise_value_errors(kwargs: dict, message: str) -> None:
    settings = {"env": InvalidActionEnvDiscrete(dim=4, n_invalid_actions=1), **kwargs}
    with pytest.raises(ValueError, match=message):
        MaskableTRPO("MlpPolicy", n_steps=16, **settings)


def test_environment_without_masks_is_rejected_unless_masking_is_off() -> None:
    model = MaskableTRPO("MlpPolicy", IdentityEnv(dim=3), n_steps=16, seed=0)
    with pytest.raises(ValueError, match="ActionMasker"):
        model.learn(16)
    model.learn(32, use_masking=False)
    assert model.num_timesteps == 32


class SuccessRate(BaseCallback):
    def __init__(self) -> None:
        super().__init__()
        self.rates: list[float] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.rates.append(float(self.model.rollout_buffer.rewards.mean()))


@pytest.mark.slow
def test_learns_at_least_as_fast_as_maskable_ppo() -> None:
    """Fraction of correct actions in the training rollouts, InvalidActionEnvDiscrete(dim=20, n_invalid_actions=10).

    Same n_steps=256, gamma=0.4, default networks, 4096 steps (16 rollouts) each. ``target_kl=0.03``
    is the trust region that gives MaskableTRPO the same KL per update as MaskablePPO's defaults
    (clip 0.2, 10 epochs of 64), the KL between the policies before and after each update measured
    on the rollout. On seeds 0 and 1, MaskableTRPO must do at least as well as MaskablePPO over the
    16 rollouts and choose a correct action most of the time in the last one (a random masked
    policy: one time in ten).
    """
    results = {}
    for name in ("MaskableTRPO", "MaskablePPO"):
        rates = []
        for seed in (0, 1):
            env = InvalidActionEnvDiscrete(dim=20, n_invalid_actions=10)
            if name == "MaskableTRPO":
                model = MaskableTRPO("MlpPolicy", env, n_steps=256, gamma=0.4, target_kl=0.03, seed=seed)
            else:
                model = MaskablePPO("MlpPolicy", env, n_steps=256, gamma=0.4, seed=seed)
            callback = SuccessRate()
            model.learn(4096, callback=callback)
            rates.append(callback.rates)
        results[name] = np.array(rates)
    trpo, ppo = results["MaskableTRPO"], results["MaskablePPO"]
    print(f"TRPO {trpo.mean():.3f} / {trpo[:, -1].mean():.3f}, PPO {ppo.mean():.3f} / {ppo[:, -1].mean():.3f}")
    assert trpo.mean() >= ppo.mean()
    assert trpo[:, -1].mean() >= 0.7
