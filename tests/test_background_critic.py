"""The background critic fit under faults: real signals sent to real processes.

Every wait has a timeout; a scenario that needs the training process itself to die or
be interrupted runs it as a child process in its own process group.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import pickle
import resource
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch as th
from sb3_contrib.common.envs import InvalidActionEnvDiscrete
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

import sb3_trpo.common.critic as critic
import sb3_trpo.common.critic_fitter as critic_fitter
import sb3_trpo.common.critic_worker as critic_worker
import sb3_trpo.common.os_process as os_process
from sb3_trpo import TRPO, MaskableTRPO, NonFiniteError, RecurrentTRPO
from sb3_trpo.common.critic import CriticSnapshot, regress
from sb3_trpo.common.critic_worker import background_unavailable
from tests.helpers import exited, recording_logger

SMALL = dict(n_steps=64, batch_size=8, n_critic_updates=30, seed=0, policy_kwargs=dict(net_arch=[16]))
CHILD_TIMEOUT_S = 120


def worker_pid(model: TRPO) -> int | None:
    worker = model.critic_fitter.worker
    return None if worker is None else worker.pid


def same_weights_and_optimizer_state(a: TRPO, b: TRPO) -> bool:
    if not all(th.equal(p, q) for p, q in zip(a.policy.parameters(), b.policy.parameters(), strict=True)):
        return False
    states = a.policy.optimizer.state_dict()["state"], b.policy.optimizer.state_dict()["state"]
    return states[0].keys() == states[1].keys() and all(
        all(th.equal(states[0][k][name], states[1][k][name]) for name in states[0][k]) for k in states[0]
    )


class AtRolloutStep(BaseCallback):
    """Calls ``action`` once, at the first step of the rollout of update ``update``."""

    def __init__(self, update: int, action):
        super().__init__()
        self.update, self.action = update, action

    def _on_step(self) -> bool:
        model = self.model
        if model._n_updates == self.update - 1 and model.rollout_buffer.pos == 0:
            self.action(model)
        return True


def sequential_reference(updates: int) -> TRPO:
    return TRPO("MlpPolicy", "Pendulum-v1", background_critic_fit=False, **SMALL).learn(updates * SMALL["n_steps"])


@pytest.fixture
def background_model() -> Iterator[TRPO]:
    model = TRPO("MlpPolicy", "Pendulum-v1", background_critic_fit=True, **SMALL)
    yield model
    model.critic_fitter.close()


def _default_sigint() -> None:
    # As a terminal starts a program: a test run started with "&" by a script ignores SIGINT,
    # which the child would inherit, and Python then installs no KeyboardInterrupt handler.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_child(code: str) -> subprocess.Popen:
    """Start :data:`CHILD_PRELUDE` and ``code`` in a Python process of its own process group, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_default_sigint,
    )


def kill_group(child: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    if child.returncode is None:
        child.communicate(timeout=CHILD_TIMEOUT_S)


def read_until(child: subprocess.Popen, prefix: str) -> list[str]:
    """The words of the child's first stdout line starting with ``prefix``."""
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith(prefix):
            return line.split()
    _, stderr = child.communicate(timeout=CHILD_TIMEOUT_S)
    raise AssertionError(f"the child ended without printing {prefix!r}:\n{stderr}")


CHILD_PRELUDE = f"""
import os, sys, time
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from sb3_trpo import TRPO
SMALL = {SMALL!r}

def worker_pid(model):
    return model.critic_fitter.worker.pid

class Ready(BaseCallback):
    # At the first step of update 3's rollout (update 2's fit is in the worker): say so, then wait.
    def _on_step(self):
        if self.model._n_updates == 2 and self.model.rollout_buffer.pos == 0:
            print("ready", worker_pid(self.model), flush=True)
            time.sleep({CHILD_TIMEOUT_S})
        return True
"""


def test_ctrl_c_raises_keyboard_interrupt_and_the_model_saves_and_trains_on(tmp_path: Path) -> None:
    child = run_child(
        f"""
        model = TRPO("MlpPolicy", "Pendulum-v1", background_critic_fit=True, **SMALL)
        try:
            model.learn(10 * SMALL["n_steps"], callback=Ready())
        except KeyboardInterrupt:
            print("interrupted", model._n_updates, worker_pid(model), flush=True)
        reference = TRPO("MlpPolicy", "Pendulum-v1", background_critic_fit=False, **SMALL)
        reference.learn(model._n_updates * SMALL["n_steps"])
        same = all(th.equal(a, b) for a, b in zip(model.policy.parameters(), reference.policy.parameters()))
        model.save({str(tmp_path / "model")!r})
        model.learn(2 * SMALL["n_steps"], reset_num_timesteps=False)
        model.save({str(tmp_path / "later")!r})
        loaded = TRPO.load({str(tmp_path / "later")!r})
        saved = all(th.equal(a, b) for a, b in zip(model.policy.parameters(), loaded.policy.parameters()))
        print("after", same, model._n_updates, saved, flush=True)
        """
    )
    try:
        _, worker = read_until(child, "ready")
        os.killpg(child.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
        assert read_until(child, "interrupted") == ["interrupted", "2", worker]
        assert read_until(child, "after") == ["after", "True", "4", "True"]
        _, stderr = child.communicate(timeout=CHILD_TIMEOUT_S)
    finally:
        kill_group(child)
    assert child.returncode == 0, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


def test_the_worker_exits_when_the_training_process_is_killed_and_holds_no_inherited_descriptor() -> None:
    child = run_child(
        """
        from stable_baselines3.common.env_util import make_vec_env
        from stable_baselines3.common.vec_env import SubprocVecEnv
        if __name__ == "__main__":
            # Forked environment workers: their pipes are open in the training process when the critic worker forks.
            env = make_vec_env("Pendulum-v1", n_envs=2, vec_env_cls=SubprocVecEnv, vec_env_kwargs=dict(start_method="fork"))
            other = TRPO("MlpPolicy", "Pendulum-v1", background_critic_fit=True, **SMALL).learn(2 * SMALL["n_steps"])
            model = TRPO("MlpPolicy", env, background_critic_fit=True, **SMALL)
            model.learn(10**6, callback=Ready())
        """
    )
    try:
        _, worker = read_until(child, "ready")
        descriptors = {int(fd): os.readlink(f"/proc/{worker}/fd/{fd}") for fd in os.listdir(f"/proc/{worker}/fd")}
        sockets = [target for fd, target in descriptors.items() if fd > 2 and target.startswith("socket:")]
        others = [target for fd, target in descriptors.items() if fd > 2 and not target.startswith(("socket:", "/dev/null"))]
        assert len(sockets) == 1 and not others, descriptors
        parent_descriptors = {os.readlink(f"/proc/{child.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{child.pid}/fd")}
        assert sockets[0] not in parent_descriptors  # the worker's end, not the training process's
        os.kill(child.pid, signal.SIGKILL)
        assert exited(int(worker))
    finally:
        kill_group(child)


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP", "exception"])
def test_a_lost_worker_is_replaced_by_the_fit_in_this_process_from_the_same_state(
    background_model: TRPO, fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if fault == "SIGSTOP":
        monkeypatch.setattr(critic_worker, "_POLL_S", 0.05)
        monkeypatch.setattr(critic_worker, "_STALL_POLLS", 20)
        # At the lowest priority, the other test processes of a busy run can leave the worker
        # without CPU time for a second before the fault: only the stopped worker should stall.
        monkeypatch.setattr(critic_worker, "lowest_priority", lambda: None)
    training_process, calls_in_the_worker = os.getpid(), []
    fit_critic = critic_worker.fit_critic

    def failing_in_the_worker_at_its_second_fit(*args, **kwargs):
        if os.getpid() != training_process:
            calls_in_the_worker.append(None)
            if len(calls_in_the_worker) == 2:
                raise RuntimeError("boom")
        return fit_critic(*args, **kwargs)

    if fault == "exception":
        monkeypatch.setattr(critic_worker, "fit_critic", failing_in_the_worker_at_its_second_fit)
    workers = []

    def hurt_worker(model: TRPO) -> None:
        workers.append(worker_pid(model))
        if fault != "exception":
            os.kill(workers[0], getattr(signal, fault))
        if fault == "SIGKILL":
            assert exited(workers[0])  # a worker at the lowest priority may need a moment to die on a busy machine

    reason = {
        "SIGKILL": r"it exited \(killed by SIGKILL\)",
        "SIGSTOP": "it got no CPU time",
        "exception": "the fit raised RuntimeError: boom",
    }
    with pytest.warns(RuntimeWarning, match=rf"background critic fit of update 2 was lost: {reason[fault]}"):
        background_model.learn(4 * SMALL["n_steps"], callback=AtRolloutStep(3, hurt_worker))
    assert worker_pid(background_model) is None and exited(workers[0])
    assert same_weights_and_optimizer_state(background_model, sequential_reference(4))


def test_save_copy_and_pickle_during_a_rollout_see_the_fitted_critic(background_model: TRPO, tmp_path: Path) -> None:
    copies = {}

    def save_and_copy(model: TRPO) -> None:
        # Each of them first waits for update 1's fit, running in the worker now.
        assert model.critic_fitter.in_progress
        copies["deepcopy"] = copy.deepcopy(model)
        assert not model.critic_fitter.in_progress
        copies["pickle"] = pickle.loads(pickle.dumps(model))
        model.save(tmp_path / "model")

    background_model.learn(3 * SMALL["n_steps"], callback=AtRolloutStep(2, save_and_copy))
    reference = sequential_reference(1)
    copies["saved"] = TRPO.load(tmp_path / "model")
    for name, model in copies.items():
        assert all(th.equal(a, b) for a, b in zip(model.policy.parameters(), reference.policy.parameters(), strict=True)), name
    # A copy trains on with a worker of its own.
    copied = copies["deepcopy"]
    copied.learn(2 * SMALL["n_steps"])
    assert worker_pid(copied) not in (None, worker_pid(background_model))
    copied.critic_fitter.close()


def test_deleting_models_stops_their_workers() -> None:
    models = [TRPO("MlpPolicy", "Pendulum-v1", background_critic_fit=True, **SMALL) for _ in range(2)]
    for model in models:
        model.learn(2 * SMALL["n_steps"])
    workers = [worker_pid(model) for model in models]
    assert len(set(workers)) == 2
    del model, models
    gc.collect()
    assert all(exited(worker) for worker in workers)


def test_subprocvecenv_models_and_exit_print_no_exception() -> None:
    child = run_child(
        """
        from stable_baselines3.common.env_util import make_vec_env
        from stable_baselines3.common.vec_env import SubprocVecEnv
        if __name__ == "__main__":
            env = make_vec_env("Pendulum-v1", n_envs=2, vec_env_cls=SubprocVecEnv)
            model = TRPO("MlpPolicy", env, background_critic_fit=True, **SMALL).learn(3 * SMALL["n_steps"])
            other = TRPO("MlpPolicy", "Pendulum-v1", background_critic_fit=True, **SMALL).learn(3 * SMALL["n_steps"])
            model.learn(2 * SMALL["n_steps"])
            print("workers", worker_pid(model), worker_pid(other), flush=True)
            env.close()
            del model
        """
    )
    try:
        _, *workers = read_until(child, "workers")
        _, stderr = child.communicate(timeout=CHILD_TIMEOUT_S)
    finally:
        kill_group(child)
    assert child.returncode == 0, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert all(exited(int(worker)) for worker in workers)


def test_set_env_and_set_parameters_keep_the_background_fit_exact() -> None:
    def run(background: bool) -> TRPO:
        model = TRPO("MlpPolicy", "Pendulum-v1", background_critic_fit=background, **SMALL).learn(2 * SMALL["n_steps"])
        model.set_env(make_vec_env("Pendulum-v1", seed=3))
        model.set_parameters(model.get_parameters())
        return model.learn(2 * SMALL["n_steps"], reset_num_timesteps=False)

    background = run(True)
    assert worker_pid(background) is not None
    assert same_weights_and_optimizer_state(background, run(False))
    background.critic_fitter.close()


def test_non_finite_critic_fit_restores_the_weights_and_the_optimizer_state() -> None:
    critic_net = th.nn.Linear(3, 1)
    optimizer = th.optim.Adam(critic_net.parameters(), lr=1e-3)
    parameters = list(critic_net.parameters())
    x, y = th.randn(8, 3), th.randn(8)
    regress(optimizer, parameters, [lambda: ((critic_net(x).flatten() - y) ** 2).mean()])
    before = CriticSnapshot(optimizer, parameters)
    kept = copy.deepcopy((critic_net.state_dict(), optimizer.state_dict()))
    exploding = [lambda: ((critic_net(x).flatten() - y) ** 2).mean() * float("inf")] * 3
    assert regress(optimizer, parameters, exploding) is None
    assert all(th.equal(a, b) for a, b in zip(critic_net.state_dict().values(), kept[0].values(), strict=True))
    for key, state in optimizer.state_dict()["state"].items():
        assert all(th.equal(value, kept[1]["state"][key][name]) for name, value in state.items())
    del before


def test_non_finite_background_fit_raises_and_restores_the_shared_optimizer_state() -> None:
    model = TRPO("MlpPolicy", "Pendulum-v1", background_critic_fit=True, **{**SMALL, "learning_rate": 1e38})
    before = copy.deepcopy(model.policy.optimizer.state_dict())
    weights = [p.detach().clone() for p in model.critic_parameters]
    with pytest.raises(NonFiniteError, match="critic fit of update 1; they were restored"):
        model.learn(3 * SMALL["n_steps"])
    assert all(th.equal(a, b) for a, b in zip(model.critic_parameters, weights, strict=True))
    after = model.policy.optimizer.state_dict()["state"]
    assert before["state"] == {} and all(float(state["step"]) == 0 and not state["exp_avg"].any() for state in after.values())
    model.critic_fitter.close()


def test_auto_fits_in_the_background_only_where_it_can_and_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    assert TRPO("MlpPolicy", "Pendulum-v1", **SMALL).critic_fitter.background == (len(os.sched_getaffinity(0)) >= 2)
    assert not TRPO("MlpPolicy", "Pendulum-v1", background_critic_fit=False, **SMALL).critic_fitter.background
    rmsprop = dict(optimizer_class=th.optim.RMSprop, net_arch=[16])
    assert not TRPO("MlpPolicy", "Pendulum-v1", **{**SMALL, "policy_kwargs": rmsprop}).critic_fitter.background
    assert background_unavailable(th.device("cuda"), th.optim.Adam) == "it runs on the CPU only, and the policy is on cuda"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert not TRPO("MlpPolicy", "Pendulum-v1", **SMALL).critic_fitter.background


def test_true_is_refused_where_it_cannot_run_and_degrades_on_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rmsprop = dict(optimizer_class=th.optim.RMSprop, net_arch=[16])
    with pytest.raises(ValueError, match=r"^background_critic_fit=True cannot run: it needs Adam or AdamW"):
        TRPO("MlpPolicy", "Pendulum-v1", background_critic_fit=True, **{**SMALL, "policy_kwargs": rmsprop})
    with pytest.raises(ValueError, match=r'^background_critic_fit must be True, False or "auto", got 1'):
        TRPO("MlpPolicy", "Pendulum-v1", background_critic_fit=1, **SMALL)  # type: ignore[arg-type]
    TRPO("MlpPolicy", "Pendulum-v1", background_critic_fit=True, **SMALL).save(tmp_path / "model")
    monkeypatch.setattr(critic_worker.multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    with pytest.raises(ValueError, match=r"^background_critic_fit=True cannot run: this platform cannot fork"):
        TRPO("MlpPolicy", "Pendulum-v1", background_critic_fit=True, **SMALL)
    assert not TRPO("MlpPolicy", "Pendulum-v1", **SMALL).critic_fitter.background
    with pytest.warns(RuntimeWarning, match="background_critic_fit=True cannot run here .this platform cannot fork"):
        loaded = TRPO.load(tmp_path / "model", env=make_vec_env("Pendulum-v1"))
    assert loaded.background_critic_fit is True and not loaded.critic_fitter.background
    loaded.learn(SMALL["n_steps"])
    assert np.isfinite(loaded.logger.name_to_value["train/value_loss"])


@pytest.mark.parametrize(
    ("algorithm", "policy", "env"),
    [
        (MaskableTRPO, "MlpPolicy", InvalidActionEnvDiscrete(dim=10, n_invalid_actions=3)),
        (RecurrentTRPO, "MlpLstmPolicy", "CartPole-v1"),
    ],
)
def test_variants_whose_rollout_reads_the_critic_refuse_true_and_fit_here_on_auto(algorithm, policy, env) -> None:
    with pytest.raises(ValueError, match=rf"^background_critic_fit must be False for {algorithm.__name__}"):
        algorithm(policy, env, background_critic_fit=True, n_steps=64)
    model = algorithm(policy, env, n_steps=64, batch_size=32, seed=0)
    assert model.background_critic_fit == "auto" and not model.critic_fitter.background


def test_spare_cpus_count_idle_time_and_the_workers_time_over_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    tick_s = 1 / os.sysconf("SC_CLK_TCK")
    earlier = critic_fitter.CpuSample(wall_s=10.0, idle_ticks=1000, worker=7, worker_ticks=50)
    idle_half_the_time = critic_fitter.CpuSample(wall_s=12.0, idle_ticks=1000 + round(1.0 / tick_s), worker=7, worker_ticks=50)
    assert idle_half_the_time.spare_cpus_since(earlier) == pytest.approx(0.5)
    # The worker's CPU time was nobody else's (it runs at the lowest priority): spare as well.
    worker_busy = critic_fitter.CpuSample(wall_s=12.0, idle_ticks=1000, worker=7, worker_ticks=50 + round(1.5 / tick_s))
    assert worker_busy.spare_cpus_since(earlier) == pytest.approx(0.75)
    other_worker = critic_fitter.CpuSample(wall_s=12.0, idle_ticks=1000, worker=8, worker_ticks=10**6)
    assert other_worker.spare_cpus_since(earlier) == 0
    too_short = critic_fitter.CpuSample(wall_s=10.01, idle_ticks=2000, worker=7, worker_ticks=50)
    assert too_short.spare_cpus_since(earlier) is None
    unknown = critic_fitter.CpuSample(wall_s=12.0, idle_ticks=None, worker=7, worker_ticks=50)
    assert unknown.spare_cpus_since(earlier) is None
    # /proc/stat: idle and iowait of the process's CPUs only.
    stat = "cpu  9 9 9 9 9 9 9 9 9 9\ncpu0 1 2 3 40 5 6 7 8 9 10\ncpu1 1 2 3 400 50 6 7 8 9 10\nintr 1\n"
    monkeypatch.setattr(os_process, "open", lambda *args: __import__("io").BytesIO(stat.encode()), raising=False)
    assert os_process.idle_cpu_ticks({1}) == 450 and os_process.idle_cpu_ticks({0, 1}) == 495


@pytest.mark.parametrize("spare_s_per_s", [0.0, 0.4, 0.6])
def test_auto_sends_a_fit_to_the_worker_only_after_a_rollout_that_left_a_cpu_spare(
    monkeypatch: pytest.MonkeyPatch, spare_s_per_s: float
) -> None:
    if not critic_fitter.background_pays():
        pytest.skip("auto fits in the background only with two CPUs")
    # A machine whose CPUs are idle spare_s_per_s of every second; each sample a second after the previous one.
    samples = iter(range(10**6))

    def sample(cls, worker: int | None) -> critic_fitter.CpuSample:
        wall_s = float(next(samples))
        return critic_fitter.CpuSample(wall_s, round(wall_s * spare_s_per_s * os.sysconf("SC_CLK_TCK")), worker, 0)

    monkeypatch.setattr(critic_fitter.CpuSample, "now", classmethod(sample))
    model = TRPO("MlpPolicy", "Pendulum-v1", **SMALL)
    submitted = []
    send = critic_worker.CriticWorker.send
    monkeypatch.setattr(
        critic_worker.CriticWorker, "send", lambda worker, job: submitted.append(model._n_updates + 1) or send(worker, job)
    )
    model.learn(4 * SMALL["n_steps"])
    # The first rollout is measured from the model's construction; the last fit runs here (no rollout follows it).
    if spare_s_per_s >= critic_fitter.AUTO_MIN_SPARE_CPUS:
        assert submitted == [1, 2, 3]
        model.critic_fitter.close()
    else:
        assert submitted == [] and model.critic_fitter.worker is None  # no worker was started
    assert same_weights_and_optimizer_state(model, sequential_reference(4))


def slow_minibatches_in_the_worker(monkeypatch: pytest.MonkeyPatch, seconds: float, at_least: int) -> None:
    """Each minibatch of a fit in a worker process takes ``seconds`` longer, sleeping (no CPU time), and the worker
    fits ``at_least`` minibatches before it honours a request to stop (on a busy machine it may get no CPU)."""
    training_process, mse_loss, regress = os.getpid(), critic.F.mse_loss, critic.regress

    def slow_mse_loss(*args, **kwargs):
        if os.getpid() != training_process:
            time.sleep(seconds)
        return mse_loss(*args, **kwargs)

    def regress_at_least(optimizer, parameters, minibatches, before=None, losses=None, stop=None):
        if os.getpid() != training_process and stop is not None:
            asked, honoured = iter(range(10**9)), stop
            stop = lambda: next(asked) >= at_least and honoured()  # noqa: E731
        return regress(optimizer, parameters, minibatches, before, losses, stop)

    monkeypatch.setattr(critic.F, "mse_loss", slow_mse_loss)
    monkeypatch.setattr(critic, "regress", regress_at_least)


def test_a_fit_unfinished_at_the_end_of_the_rollout_is_finished_here_with_the_same_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slow_minibatches_in_the_worker(monkeypatch, 0.01, at_least=5)
    training_process, fit_critic = os.getpid(), critic_fitter.fit_critic
    worker_minibatches: list[int | None] = []  # of each fit finished here: how many the worker had fitted

    def recorded(policy, optimizer, parameters, job, before=None, losses=None, stop=None):
        if os.getpid() == training_process:
            worker_minibatches.append(None if losses is None else len(losses))
        return fit_critic(policy, optimizer, parameters, job, before, losses, stop)

    monkeypatch.setattr(critic_fitter, "fit_critic", recorded)
    model = TRPO("MlpPolicy", "Pendulum-v1", background_critic_fit=True, **SMALL)
    logger = recording_logger(model)
    model.learn(4 * SMALL["n_steps"])
    minibatches = SMALL["n_critic_updates"] * SMALL["n_steps"] // SMALL["batch_size"]
    # Updates 1-3 were stopped in the worker when the next rollout ended and finished here; the
    # last one ran here from its start (no rollout follows it).
    assert len(worker_minibatches) == 4 and worker_minibatches[3] is None, worker_minibatches
    assert all(5 <= done < minibatches for done in worker_minibatches[:3]), worker_minibatches
    assert worker_pid(model) is not None and model.critic_fitter.background
    assert same_weights_and_optimizer_state(model, sequential_reference(4))
    reference = TRPO("MlpPolicy", "Pendulum-v1", background_critic_fit=False, **SMALL)
    reference_logger = recording_logger(reference)
    reference.learn(4 * SMALL["n_steps"])
    losses = logger.values("train/value_loss")
    assert len(losses) == 4 and losses == reference_logger.values("train/value_loss")
    model.critic_fitter.close()


def test_the_worker_runs_only_on_cpu_time_nobody_else_wants(background_model: TRPO) -> None:
    background_model.learn(2 * SMALL["n_steps"])
    assert os.sched_getscheduler(worker_pid(background_model)) == os.SCHED_IDLE
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the training process keeps its priority


def test_the_worker_works_with_descriptors_numbered_above_1024() -> None:
    # Each tensor moved to shared memory keeps a descriptor open: many models reach select()'s limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip("needs 2048 file descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        model = TRPO("MlpPolicy", "Pendulum-v1", background_critic_fit=True, **SMALL).learn(3 * SMALL["n_steps"])
        assert model.critic_fitter.worker.fileno() > 1024
        assert same_weights_and_optimizer_state(model, sequential_reference(3))
        model.critic_fitter.close()
    finally:
        for descriptor in spare:
            os.close(descriptor)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
