"""The rollout's actor with MKL's ``sgemm_`` called directly: a timing experiment (see README.md).

``python direct_mkl.py steps``: per-step sampling time between real Hopper-v5 steps, the package's
sampler against this one (bitwise equality asserted first).
``python direct_mkl.py learn ENV_ID``: ``sb3_trpo.benchmark.speed.measure`` in alternating
processes, the package's sampler against this one.
"""

from __future__ import annotations

import collections
import ctypes
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy

import sb3_trpo.common.rollout as rollout

_LIB = ctypes.CDLL(str(Path(th.__file__).parent / "lib" / "libtorch_cpu.so"))
_SGEMM = _LIB.sgemm_
_SGEMM.restype = None
_T, _N = ctypes.c_char_p(b"t"), ctypes.c_char_p(b"n")
_ONE = ctypes.byref(ctypes.c_float(1.0))


class DirectLinear:
    """``F.linear`` for ``rows`` contiguous float32 rows as torch's ``addmm`` computes it: the
    output preloaded with the bias, then ``sgemm_('t', 'n', out, rows, in, 1, W, in, x, in, 1, y, out)``."""

    def __init__(self, linear: th.nn.Linear, rows: int) -> None:
        self.parameters = linear._parameters
        out_features, in_features = linear.weight.shape
        self.rows, self.row_bytes = rows, 4 * out_features
        self.n = ctypes.byref(ctypes.c_int(out_features))
        self.m = ctypes.byref(ctypes.c_int(rows))
        self.k = ctypes.byref(ctypes.c_int(in_features))
        self.out = th.empty(rows, out_features)
        self.out_ptr = self.out.data_ptr()

    def __call__(self, x: th.Tensor) -> th.Tensor:
        bias = self.parameters["bias"].data_ptr()  # type: ignore[union-attr]
        for row in range(self.rows):
            ctypes.memmove(self.out_ptr + row * self.row_bytes, bias, self.row_bytes)
        weight = ctypes.c_void_p(self.parameters["weight"].data_ptr())  # type: ignore[union-attr]
        _SGEMM(_T, _N, self.n, self.m, self.k, _ONE, weight, self.k, ctypes.c_void_p(x.data_ptr()), self.k, _ONE,
               ctypes.c_void_p(self.out_ptr), self.n)
        return self.out


def direct_sampler(policy: ActorCriticPolicy) -> Callable[[np.ndarray], np.ndarray]:
    modules = [*policy.mlp_extractor.policy_net, policy.action_net]
    own, noise, layers = policy._parameters, {}, []  # type: ignore[var-annotated]
    no_grad = th.no_grad()

    def sample(observations: np.ndarray) -> np.ndarray:
        if not layers:
            rows = observations.shape[0]
            layers.extend(DirectLinear(m, rows) if type(m) is th.nn.Linear else m.forward for m in modules)
        with no_grad:
            latent = th.from_numpy(observations.astype(np.float32))
            for layer in layers:
                latent = layer(latent)
            mean = latent.numpy()
            std = own["log_std"].exp().numpy()
            total = mean.sum()
            if total != total or not std.min() > 0:
                raise RuntimeError("invalid distribution (not handled in this experiment)")
            if mean.shape not in noise:
                noise[mean.shape] = th.empty(mean.shape)
            standard_normal = noise[mean.shape].normal_().numpy()
        return standard_normal * std + mean

    return sample


def steps() -> None:
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    from sb3_trpo import TRPO

    env = VecNormalize(make_vec_env("Hopper-v5", n_envs=2, seed=0))
    policy = TRPO("MlpPolicy", env, seed=0, n_steps=1024).policy
    samplers = {"current": rollout.gaussian_mlp_sampler(policy), "direct": direct_sampler(policy)}
    observations = env.reset()
    for _ in range(30):
        state = th.get_rng_state()
        actions = samplers["current"](observations)
        th.set_rng_state(state)
        assert np.array_equal(actions, samplers["direct"](observations))
        observations, *_ = env.step(np.clip(actions, -1, 1))
    microseconds = collections.defaultdict(list)
    for _ in range(5):
        for name, sample in samplers.items():
            spent = 0.0
            for _ in range(2000):
                start = time.perf_counter()
                actions = sample(observations)
                spent += time.perf_counter() - start
                observations, *_ = env.step(np.clip(actions, -1, 1))
            microseconds[name].append(round(spent / 2000 * 1e6, 1))
    for name, values in microseconds.items():
        print(name, values, "median", sorted(values)[len(values) // 2])


def learn(env_id: str, mode: str) -> None:
    from sb3_trpo.benchmark import speed

    if mode == "direct":
        rollout.gaussian_mlp_sampler = direct_sampler
    print(json.dumps(speed.measure("sb3_trpo", env_id, 20480, 0, "auto")))


def compare(env_id: str) -> None:
    results: dict[str, list] = {"current": [], "direct": []}
    for repetition in range(4):
        for mode in ("current", "direct") if repetition % 2 == 0 else ("direct", "current"):
            command = [sys.executable, __file__, "_learn", env_id, mode]
            result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            results[mode].append((round(result["steps_per_s"]), round(result["rollout_s"], 2)))
    print(env_id, results)


if __name__ == "__main__":
    if sys.argv[1] == "steps":
        steps()
    elif sys.argv[1] == "_learn":
        learn(sys.argv[2], sys.argv[3])
    else:
        compare(sys.argv[2])
