"""Every callback runs with the batched loop and sees what SB3's loop gives it; the rollout stays SB3's.

A matrix of callbacks (what a user's callback does) by policies (MlpPolicy on Box and Discrete
actions, MultiInputPolicy, a CNN), each run on two models built from the same seed: one with
our ``collect_rollouts``, one with SB3's own ``OnPolicyAlgorithm.collect_rollouts``. Compared:
the rollout (``tests.test_rollout._assert_same_rollout``: actions, observations, rewards and
episode starts bitwise, values, log-probabilities, advantages and returns to 1e-6), the key
set of ``self.locals`` at every call, and what the callbacks read from it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import SimpleMultiObsEnv
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy

from sb3_trpo import TRPO
from sb3_trpo.common import rollout_locals
from sb3_trpo.common.rollout_gate import SB3_ROLLOUT_LOCALS, batched_rollout_sampler
from sb3_trpo.common.rollout_locals import LazyLocals
from tests.test_rollout import SEED, _assert_same_rollout, _image_env

K = 5  # the step at which the callbacks that act, act


class Recording(BaseCallback):
    """Records the key set of ``self.locals`` at every call, and what each subclass reads."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[frozenset[str]] = []
        self.read: list[Any] = []

    def _on_rollout_start(self) -> None:
        self.keys.append(frozenset(self.locals.keys()))

    def _on_step(self) -> bool:
        self.keys.append(frozenset(self.locals.keys()))
        return self.act()

    def _on_rollout_end(self) -> None:
        self.keys.append(frozenset(self.locals.keys()))

    def act(self) -> bool:
        return True


class ReadsInfos(Recording):
    def act(self) -> bool:
        # Monitor's episode records without their wall-clock time "t".
        self.read.append([(info["episode"]["r"], info["episode"]["l"]) for info in self.locals["infos"] if "episode" in info])
        return True


class ReadsOutputs(Recording):
    def act(self) -> bool:
        self.read.append(
            [self.locals[name].clone() for name in ("values", "log_probs")] + [th.as_tensor(self.locals["obs_tensor"]).clone()]
            if not isinstance(self.locals["obs_tensor"], dict)
            else [self.locals[name].clone() for name in ("values", "log_probs")]
        )
        return True


class EditsWeights(Recording):
    """Moves the actor's mean and the critic at step K, with torch operations (the rollout follows them)."""

    def act(self) -> bool:
        if self.n_calls == K:
            with th.no_grad():
                self.model.policy.action_net.bias.add_(0.5)
                self.model.policy.value_net.bias.add_(3.0)
        return True


class DrawsRandomNumbers(Recording):
    def act(self) -> bool:
        self.read.append(th.rand(2))
        return True


class StopsAt(Recording):
    def act(self) -> bool:
        return self.n_calls < K


class ResetsEnvAndMode(Recording):
    """At step K: the policy to training mode, the environments reset (as a curriculum might); SB3's loop
    stores the reset observations with the step's action, whose outputs came from the observations before."""

    def act(self) -> bool:
        if self.n_calls == K:
            self.model.policy.set_training_mode(True)
            self.model._last_obs = self.training_env.reset()
        return True


class MyEval(EvalCallback):
    """A user's subclass of EvalCallback, with a recording child."""


CALLBACKS: dict[str, Callable[[Any], BaseCallback]] = {
    "no-op": lambda make_env: Recording(),
    "reads-infos": lambda make_env: ReadsInfos(),
    "reads-outputs": lambda make_env: ReadsOutputs(),
    "eval-subclass": lambda make_env: CallbackList([MyEval(make_env(1), eval_freq=4, n_eval_episodes=1), Recording()]),
    "edits-weights": lambda make_env: EditsWeights(),
    "draws-rng": lambda make_env: DrawsRandomNumbers(),
    "stops": lambda make_env: StopsAt(),
    "resets-env-and-mode": lambda make_env: ResetsEnvAndMode(),
}


def _cartpole(n_envs: int) -> Any:
    return make_vec_env("CartPole-v1", n_envs=n_envs, seed=0)


POLICIES: dict[str, dict[str, Any]] = {
    "mlp-box": dict(policy="MlpPolicy", env=lambda n_envs: make_vec_env("Pendulum-v1", n_envs=n_envs, seed=0)),
    "mlp-discrete": dict(policy="MlpPolicy", env=_cartpole),
    "multi-input": dict(
        policy="MultiInputPolicy", env=lambda n_envs: make_vec_env(lambda: SimpleMultiObsEnv(random_start=True), n_envs=n_envs)
    ),
    "cnn": dict(policy="CnnPolicy", env=lambda n_envs: make_vec_env(_image_env(36), n_envs=n_envs)),
}


def _recorders(callback: BaseCallback) -> list[Recording]:
    return [member for member in rollout_locals.callbacks_in(callback) if isinstance(member, Recording)]


def _run(collect: Callable, policy: str, callback_name: str) -> tuple[TRPO, bool, list[Recording]]:
    spec = POLICIES[policy]
    np.random.seed(0)
    model = TRPO(spec["policy"], spec["env"](2), n_steps=16, seed=0, background_critic_fit=False)
    _, callback = model._setup_learn(10**6, CALLBACKS[callback_name](spec["env"]))
    callback.on_training_start(locals(), globals())
    th.manual_seed(SEED)
    returned = collect(model, model.env, callback, model.rollout_buffer, model.n_steps)
    return model, returned, _recorders(callback)


@pytest.mark.parametrize("callback_name", list(CALLBACKS))
@pytest.mark.parametrize("policy", list(POLICIES))
def test_callbacks_see_sb3_locals_and_leave_sb3_rollout(policy: str, callback_name: str) -> None:
    ours, returned, recorders = _run(TRPO.collect_rollouts, policy, callback_name)
    sb3, sb3_returned, sb3_recorders = _run(OnPolicyAlgorithm.collect_rollouts, policy, callback_name)
    assert batched_rollout_sampler(ours.policy, ours.rollout_buffer) is not None
    assert returned == sb3_returned == (callback_name != "stops")
    _assert_same_rollout(ours, sb3)
    for mine, theirs in zip(recorders, sb3_recorders, strict=True):
        assert mine.n_calls == theirs.n_calls > 0
        assert mine.keys == theirs.keys
        assert SB3_ROLLOUT_LOCALS - {"idx", "done", "terminal_obs", "terminal_value"} <= mine.keys[-1]
        for read, sb3_read in zip(mine.read, theirs.read, strict=True):
            # What a callback reads is SB3's to the bit (the per-step outputs by SB3's per-step computation).
            if isinstance(read, list) and read and isinstance(read[0], th.Tensor):
                assert all(th.equal(a, b) for a, b in zip(read, sb3_read, strict=True))
            elif isinstance(read, th.Tensor):
                assert th.equal(read, sb3_read)
            else:
                assert read == sb3_read


def test_a_callback_drawing_random_numbers_shifts_both_loops_alike() -> None:
    """The draws shift the actions (so the comparison above is not vacuous), and both loops the same way."""
    plain, _, _ = _run(TRPO.collect_rollouts, "mlp-box", "no-op")
    drawing, _, _ = _run(TRPO.collect_rollouts, "mlp-box", "draws-rng")
    same = np.all(plain.rollout_buffer.actions == drawing.rollout_buffer.actions, axis=(1, 2))
    assert same[0] and not same[1:].any()  # the first draw follows the first step's action


def test_a_callback_writing_weights_is_seen_and_changes_values_from_its_step() -> None:
    edited, _, _ = _run(TRPO.collect_rollouts, "mlp-box", "edits-weights")
    plain, _, _ = _run(TRPO.collect_rollouts, "mlp-box", "no-op")
    # The K-th call follows step K (row K-1): rows up to K-1 were taken before the edit (the row
    # of the step at which it came is computed per step, the others in one pass: rounding apart).
    difference = np.abs(edited.rollout_buffer.values - plain.rollout_buffer.values).max(axis=1)
    assert (difference[:K] < 1e-5).all() and (difference[K:] > 1.0).all()


def test_outputs_are_computed_only_when_read(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = ActorCriticPolicy.predict_values

    def counting(self: ActorCriticPolicy, obs: Any) -> th.Tensor:
        calls.append(len(obs))
        return original(self, obs)

    monkeypatch.setattr(ActorCriticPolicy, "predict_values", counting)
    _run(TRPO.collect_rollouts, "mlp-box", "reads-infos")
    # The model's construction (split_actor_critic, one observation), the batched pass (16 steps
    # of 2 environments), the last step's outputs, which self.locals keeps after the rollout
    # (computed before the update changes the weights), the last values.
    assert calls == [1, 32, 2, 2]
    calls.clear()
    _run(TRPO.collect_rollouts, "mlp-box", "reads-outputs")
    assert calls == [1] + [2] * 16 + [32, 2]


def test_lazy_locals_compute_on_every_kind_of_read() -> None:
    computed: list[int] = []

    def fresh() -> LazyLocals:
        return LazyLocals(a=1, b=rollout_locals.Deferred(lambda: computed.append(1) or 2))

    assert "b" in fresh() and len(fresh()) == 2 and list(fresh().keys()) == ["a", "b"] and computed == []
    reads: list[Callable[[LazyLocals], Any]] = [
        lambda x: x["b"],
        lambda x: x.get("b"),
        lambda x: dict(x)["b"],
        lambda x: {**x}["b"],
        lambda x: x.copy()["b"],
        lambda x: dict(x.items())["b"],
        lambda x: list(x.values())[1],
        lambda x: (x | {})["b"],
        lambda x: x.pop("b"),
        lambda x: x.setdefault("b", 0),
    ]
    for read in reads:
        assert read(fresh()) == 2
    plain: dict[str, Any] = {}
    plain.update(fresh())
    assert plain["b"] == 2
    target = LazyLocals()
    target.update(fresh())
    assert type(dict.__getitem__(target, "b")) is rollout_locals.Deferred  # copied uncomputed
    assert fresh() == {"a": 1, "b": 2}


# ------------------------------------------------------------------ with the critic's background fit
SMALL = dict(n_steps=64, batch_size=32, n_critic_updates=10, seed=0, policy_kwargs=dict(net_arch=[16]))


class SeesTheFit(BaseCallback):
    """Records, at the first step of each rollout, whether a critic fit was running in the background,
    and optionally reads the step's values (which needs the fitted critic)."""

    def __init__(self, read_values: bool) -> None:
        super().__init__()
        self.read_values = read_values
        self.in_progress: list[bool] = []
        self.values: list[th.Tensor] = []

    def _on_step(self) -> bool:
        if self.model.rollout_buffer.pos == 0:
            self.in_progress.append(self.model.critic_fitter.in_progress)
            if self.read_values:
                self.values.append(self.locals["values"].clone())
        return True


@pytest.mark.parametrize("read_values", [False, True], ids=["no-read", "reads-values"])
def test_the_background_fit_overlaps_rollouts_with_user_callbacks(read_values: bool) -> None:
    callbacks = [SeesTheFit(read_values) for _ in range(2)]
    background, sequential = (
        TRPO("MlpPolicy", "Pendulum-v1", background_critic_fit=setting, **SMALL).learn(4 * SMALL["n_steps"], callback=callback)
        for setting, callback in zip((True, False), callbacks, strict=True)
    )
    try:
        # Rollouts 2-4 started with the previous update's fit in the worker (rollout 1 follows no fit).
        assert callbacks[0].in_progress == [False, True, True, True]
        assert not any(callbacks[1].in_progress)
        assert all(th.equal(a, b) for a, b in zip(background.policy.parameters(), sequential.policy.parameters(), strict=True))
        assert all(th.equal(a, b) for a, b in zip(callbacks[0].values, callbacks[1].values, strict=True))
    finally:
        background.critic_fitter.close()


class WritesThroughData(Recording):
    def act(self) -> bool:
        if self.n_calls == K:
            self.model.policy.action_net.bias.data.add_(0.5)
        return True


class AddsHook(Recording):
    def act(self) -> bool:
        if self.n_calls == K:
            self.model.policy.action_net.register_forward_hook(lambda *_: None)
        return True


@pytest.mark.parametrize("callback", [WritesThroughData, AddsHook], ids=["data-write", "new-hook"])
def test_changes_torch_does_not_count_raise_at_the_end_of_the_rollout(callback: type[Recording]) -> None:
    CALLBACKS["uncounted"] = lambda make_env: callback()
    try:
        with pytest.raises(RuntimeError, match="cannot follow"):
            _run(TRPO.collect_rollouts, "mlp-box", "uncounted")
    finally:
        del CALLBACKS["uncounted"]


class WritesTheCriticDuringTheFit(BaseCallback):
    """At the first step of the second rollout (the first fit then runs in the worker), writes a critic weight."""

    def __init__(self) -> None:
        super().__init__()
        self.fit_in_progress: bool | None = None

    def _on_step(self) -> bool:
        if self.num_timesteps == SMALL["n_steps"] + 1:
            self.fit_in_progress = self.model.critic_fitter.in_progress
            with th.no_grad():
                self.model.policy.value_net.bias.add_(1.0)
        return True


def test_a_critic_write_racing_the_background_fit_stops_with_an_error() -> None:
    model = TRPO("MlpPolicy", "Pendulum-v1", background_critic_fit=True, **SMALL)
    callback = WritesTheCriticDuringTheFit()
    try:
        with pytest.raises(RuntimeError, match="background_critic_fit=False"):
            model.learn(3 * SMALL["n_steps"], callback=callback)
        assert callback.fit_in_progress is True
    finally:
        model.critic_fitter.close()
    # Without the background fit the same write is followed exactly, as every weight write is.
    callback = WritesTheCriticDuringTheFit()
    TRPO("MlpPolicy", "Pendulum-v1", background_critic_fit=False, **SMALL).learn(3 * SMALL["n_steps"], callback=callback)
    assert callback.fit_in_progress is False
