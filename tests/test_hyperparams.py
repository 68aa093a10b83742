"""The Optuna search spaces: every sampled configuration trains, and a trial turns back into a config."""

from __future__ import annotations

import math

import gymnasium as gym
import optuna
import pytest
import torch as th
import yaml
from stable_baselines3.common.env_util import make_vec_env
from torch import nn

from sb3_trpo import NPG, TRPO, RecurrentTRPO
from sb3_trpo.hyperparams import (
    ACTIVATION_FNS,
    NET_ARCHS,
    Sampler,
    config_entry,
    convert_params,
    entry_params,
    sample_acktr_params,
    sample_npg_params,
    sample_trpo_lstm_params,
    sample_trpo_mask_params,
    sample_trpo_params,
)
from sb3_trpo.zoo import CONFIG_DIR

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Small rollouts (minibatches no larger) keep one update cheap; every other sampled value is used as sampled.
MAX_N_STEPS = 64
TRPO_KNOBS = {
    "target_kl",
    "cg_max_steps",
    "cg_damping",
    "line_search_shrinking_factor",
    "line_search_max_iter",
    "n_steps",
    "gamma",
    "gae_lambda",
    "learning_rate",
    "n_critic_updates",
    "batch_size",
    "policy_kwargs",
}


def n_actions(env_id: str) -> int:
    space = gym.spec(env_id).make().action_space
    return space.shape[0] if isinstance(space, gym.spaces.Box) else 0


def train_one_update(algorithm: type[NPG], env_id: str, hyperparams: dict) -> NPG:
    n_steps = min(hyperparams["n_steps"], MAX_N_STEPS)
    hyperparams = {**hyperparams, "n_steps": n_steps, "batch_size": min(hyperparams["batch_size"], n_steps)}
    model = algorithm("MlpPolicy", make_vec_env(env_id, n_envs=1, seed=0), seed=0, device="cpu", **hyperparams)
    model.learn(hyperparams["n_steps"])
    return model


@pytest.mark.parametrize("env_id", ["Pendulum-v1", "CartPole-v1"])
def test_every_sampled_trpo_configuration_completes_an_update(env_id: str) -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    sampled = []
    for _ in range(15):
        trial = study.ask()
        hyperparams = sample_trpo_params(trial, n_actions(env_id), 1, {})
        assert set(hyperparams) == TRPO_KNOBS
        model = train_one_update(TRPO, env_id, hyperparams)
        assert model._n_updates == 1
        assert all(th.isfinite(param).all() for param in model.policy.parameters())
        study.tell(trial, 0.0)
        sampled.append(hyperparams)
    # The draws spread over the space: both ends of the ranges and every choice occur.
    assert min(h["n_steps"] for h in sampled) <= 64 and max(h["n_steps"] for h in sampled) >= 1024
    assert min(h["gamma"] for h in sampled) < 0.99 < max(h["gamma"] for h in sampled) <= 0.9999
    starts = [h["target_kl"](1.0) if callable(h["target_kl"]) else h["target_kl"] for h in sampled]
    assert min(starts) < 0.01 < max(starts) <= 0.1
    assert {callable(h["target_kl"]) for h in sampled} == {True, False}
    assert {h["policy_kwargs"]["activation_fn"] for h in sampled} == set(ACTIVATION_FNS.values())
    assert {len(h["policy_kwargs"]["net_arch"]["pi"]) for h in sampled} == {1, 2}
    assert {h["policy_kwargs"]["ortho_init"] for h in sampled} == {True, False}
    gaussian = n_actions(env_id) > 0
    assert all(("log_std_init" in h["policy_kwargs"]) == gaussian for h in sampled)


def test_every_sampled_npg_configuration_completes_an_update() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    for env_id in ("Pendulum-v1", "CartPole-v1") * 3:
        trial = study.ask()
        hyperparams = sample_npg_params(trial, n_actions(env_id), 1, {})
        assert set(hyperparams) == TRPO_KNOBS - {"line_search_shrinking_factor", "line_search_max_iter"}
        assert train_one_update(NPG, env_id, hyperparams)._n_updates == 1
        study.tell(trial, 0.0)


SAMPLERS = [sample_npg_params, sample_trpo_params, sample_trpo_mask_params, sample_trpo_lstm_params, sample_acktr_params]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda sampler: sampler.__name__)
def test_no_sampled_config_has_a_minibatch_larger_than_the_rollout(sampler: Sampler) -> None:
    # The n_envs of the tests and of the packaged configs; SB3 needs batch_size <= n_steps * n_envs.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=4))
    too_large = []
    for n_envs in (1, 2, 4, 8):
        for _ in range(200):
            trial = study.ask()
            hyperparams = sampler(trial, 1, n_envs, {})
            study.tell(trial, 0.0)
            if 2 ** trial.params["batch_size_pow"] > 2 ** trial.params["n_steps_pow"] * n_envs:
                too_large.append(trial.number)  # the draws the sampler has to correct
            # What trains, the config entry stored with the trial, and --trial-id's conversion agree.
            entry = config_entry(trial.params, n_envs=n_envs)
            assert entry == {"n_envs": n_envs, **trial.user_attrs}
            assert convert_params(trial.params) == hyperparams
            assert entry["batch_size"] == hyperparams["batch_size"] <= hyperparams["n_steps"] * n_envs, trial.params
            assert hyperparams["batch_size"] == min(2 ** trial.params["batch_size_pow"], hyperparams["n_steps"])
    assert len(too_large) > 100


def test_best_trial_turns_into_the_config_it_was_trained_with() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3), direction="maximize")
    returned = {}
    for value in (1.0, 3.0, 2.0):
        trial = study.ask()
        returned[trial.number] = sample_trpo_params(trial, 1, 2, {})
        study.tell(trial, value)
    best = study.best_trial
    assert best.number == 1
    # From the stored parameters alone: the same constructor arguments as the sampler returned.
    assert convert_params(best.params) == returned[1]
    # The user attributes are the config entry, and rl-zoo3's eval of it gives the same network.
    entry = config_entry(best.params, n_envs=2, policy="MlpPolicy")
    assert best.user_attrs == config_entry(best.params)
    assert list(entry)[:2] == ["n_envs", "policy"]
    assert eval(entry["policy_kwargs"], {"nn": nn}) == returned[1]["policy_kwargs"]
    assert entry["gamma"] == pytest.approx(1 - best.params["one_minus_gamma"])
    assert entry["n_steps"] == 2 ** best.params["n_steps_pow"]


def test_conversion_matches_hand_computed_values() -> None:
    params = {
        "target_kl": 0.02,
        "n_steps_pow": 7,
        "batch_size_pow": 6,
        "one_minus_gamma": 0.01,
        "one_minus_gae_lambda": 0.05,
        "net_arch": "medium",
        "activation_fn": "relu",
        "ortho_init": False,
    }
    hyperparams = convert_params(params)
    assert hyperparams["n_steps"] == 128 and hyperparams["batch_size"] == 64
    assert math.isclose(hyperparams["gamma"], 0.99) and math.isclose(hyperparams["gae_lambda"], 0.95)
    assert hyperparams["policy_kwargs"] == {
        "net_arch": {"pi": NET_ARCHS["medium"], "vf": NET_ARCHS["medium"]},
        "activation_fn": nn.ReLU,
        "ortho_init": False,
    }
    assert config_entry(params)["policy_kwargs"] == (
        "dict(net_arch=dict(pi=[256, 256], vf=[256, 256]), activation_fn=nn.ReLU, ortho_init=False)"
    )


MUJOCO_ENTRIES = ["HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "Ant-v5", "Swimmer-v5", "Humanoid-v5"]


def package_entry(env_id: str) -> dict:
    """The package's config entry for ``env_id`` with ``policy_kwargs`` evaluated, as rl-zoo3 does."""
    entry = yaml.safe_load((CONFIG_DIR / "trpo.yml").read_text())[env_id]
    if "policy_kwargs" in entry:
        entry["policy_kwargs"] = eval(entry["policy_kwargs"], {"nn": nn})
    return entry


@pytest.mark.parametrize("env_id", MUJOCO_ENTRIES)
def test_entry_params_train_with_the_entry_values(env_id: str) -> None:
    entry = package_entry(env_id)
    hyperparams = convert_params(entry_params(sample_trpo_params, entry, TRPO, n_actions=6))
    # TRPO's defaults (sb3-contrib's), for what the entry leaves out.
    defaults = {
        "target_kl": 0.01,
        "cg_max_steps": 15,
        "cg_damping": 0.1,
        "line_search_shrinking_factor": 0.8,
        "line_search_max_iter": 10,
        "n_steps": 2048,
        "gamma": 0.99,
        "gae_lambda": 0.95,
        "learning_rate": 1e-3,
        "n_critic_updates": 10,
        "batch_size": 128,
    }
    for name, value in hyperparams.items():
        if name != "policy_kwargs":
            expected = entry.get(name, defaults.get(name))
            assert value == pytest.approx(expected), name if expected is not None else f"{name} has no default here"
    policy_kwargs = hyperparams["policy_kwargs"]
    assert policy_kwargs["net_arch"] == {"pi": [64, 64], "vf": [64, 64]}  # SB3's default MLP
    assert policy_kwargs["activation_fn"] is nn.Tanh and policy_kwargs["ortho_init"] is True
    assert policy_kwargs["log_std_init"] == entry.get("policy_kwargs", {}).get("log_std_init", 0.0)


def test_entry_params_read_network_and_lstm_options() -> None:
    entry = {
        "policy": "MlpLstmPolicy",
        "n_steps": 256,
        "gamma": 0.999,
        "policy_kwargs": {"net_arch": [256, 256], "activation_fn": nn.ReLU, "lstm_hidden_size": 32},
    }
    params = entry_params(sample_trpo_lstm_params, entry, RecurrentTRPO, n_actions=0)
    assert params["net_arch"] == "medium" and params["activation_fn"] == "relu"
    assert params["lstm_hidden_size"] == 32 and params["enable_critic_lstm"] is True
    assert params["n_steps_pow"] == 8 and params["one_minus_gamma"] == 0.001
    assert "log_std_init" not in params  # no Box actions
    # The enqueued parameters are a point of the study's search space: a trial accepts them.
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(params)
    trial = study.ask()
    sample_trpo_lstm_params(trial, 0, 1, {})
    assert trial.params == params


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_steps": 1000}, r"^n_steps=1000 in the config entry is outside .*: powers of two from 32 to 2048$"),
        ({"gamma": 0.5}, r"^gamma=0.5 in .*: \[0.9, 0.9999\]$"),
        ({"n_steps": 64, "batch_size": 128}, r"^batch_size=128 in .*: at most n_steps \(64\), whatever n_envs$"),
        ({"target_kl": 0.5}, r"^target_kl=0.5 in .*: \[0.001, 0.1\]$"),
        ({"policy_kwargs": {"net_arch": [400, 300]}}, r"^net_arch=\[400, 300\] in .*: one of tiny, small, medium$"),
        ({"policy_kwargs": {"net_arch": {"pi": [64], "vf": [256, 256]}}}, r"^net_arch=.* one of tiny, small, medium$"),
        ({"policy_kwargs": {"activation_fn": nn.ELU}}, r"^activation_fn=ELU in .*: one of tanh, relu$"),
        ({"policy_kwargs": {"squash_output": True}}, r"^policy_kwargs squash_output in the config entry are not in"),
        (
            {"learning_rate": lambda progress: 1e-3 * progress},
            r"^learning_rate of the config entry is a schedule \(0.001 to 0.0\)",
        ),
    ],
)
def test_entry_outside_the_search_space_is_named(change: dict, message: str) -> None:
    entry = {**package_entry("HalfCheetah-v5"), **change}
    with pytest.raises(ValueError, match=message):
        entry_params(sample_trpo_params, entry, TRPO, n_actions=6)
