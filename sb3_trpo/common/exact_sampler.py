"""Actions drawn bitwise as SB3's ``policy.forward`` draws them, and every use of torch's private API.

The rollout's exactness rests on what torch does inside: which kernels a product runs, which
hooks a module call runs, which writes a parameter has seen. What is read for that through
torch's private names (module attributes, tensor version counters) is here and nowhere else,
and MKL's thread setting in ``libtorch_cpu.so`` is called through :mod:`sb3_trpo.common.native`;
each is checked before use: where a torch release no longer has one of them, :func:`torch_internals_present` is
False and every rollout runs SB3's own loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import DiagGaussianDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.torch_layers import FlattenExtractor
from stable_baselines3.common.utils import obs_as_tensor
from torch import nn
from torch.nn import functional as F

from sb3_trpo.common.native import mkl_thread_setter

Observations = np.ndarray | dict[str, np.ndarray]
ActionSampler = Callable[[Observations], np.ndarray]

# torch's ``at::internal::GRAIN_SIZE``: element-wise kernels on fewer elements run on one thread.
ELEMENTWISE_GRAIN_SIZE = 32768
# The private attributes of ``nn.Module`` read here: its parameters, and what a module call
# runs besides ``forward`` (hooks, a ``compile()``d implementation).
MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
MODULE_ATTRIBUTES = ("_parameters", *MODULE_HOOKS, "_compiled_call_impl")
GLOBAL_HOOKS = tuple(f"_global{name}" for name in MODULE_HOOKS)


# ------------------------------------------------------------------ torch's private names, checked
def torch_internals_present() -> bool:
    """Whether this torch still has every private name read here (else nothing here can be trusted).

    ``_compiled_call_impl`` is a class attribute of ``nn.Module`` (None until ``compile()``):
    read with a default, a rename would make compiled modules look plain.
    """
    probe = nn.Module()  # a module with parameters would draw its initial values from torch's generator
    registry = nn.modules.module
    return (
        all(hasattr(probe, name) for name in MODULE_ATTRIBUTES)
        and all(hasattr(registry, name) for name in GLOBAL_HOOKS)
        and hasattr(th.empty(0), "_version")
    )


def runs_only_forward(module: nn.Module) -> bool:
    """Whether calling ``module`` runs its ``forward`` and nothing else: no hook, no compiled implementation.

    Call only where :func:`torch_internals_present`.
    """
    return not any(getattr(module, name) for name in MODULE_HOOKS) and module._compiled_call_impl is None


def no_global_hooks() -> bool:
    """Whether no hook is registered for every module (``nn.modules.module.register_module_*_hook``)."""
    registry = nn.modules.module
    return not any(getattr(registry, name) for name in GLOBAL_HOOKS)


def write_marks(tensors: Iterable[th.Tensor]) -> list[tuple[int, int]]:
    """What changes when a tensor is written through torch: its memory (``.data =``) and its version counter.

    The counter counts torch's in-place operations (``add_``, ``copy_``, ``load_state_dict``,
    optimizer steps); writes through ``.data`` or a NumPy view are not counted.
    """
    return [(tensor.data_ptr(), tensor._version) for tensor in tensors]


# ------------------------------------------------------------------ actions, bitwise as SB3 draws them
def action_sampler(policy: ActorCriticPolicy) -> ActionSampler:
    """One stochastic action per observation, bitwise as SB3's ``policy.forward`` draws it.

    ``forward`` computes the values before the distribution, but the critic draws no random
    numbers, so the actor alone draws the same actions: ``get_distribution`` then
    ``get_actions``, under ``no_grad``, from the same observation tensor. A Gaussian MLP actor
    takes :func:`gaussian_mlp_sampler`, the same computation without its Python overhead.
    """
    sampler = gaussian_mlp_sampler(policy)
    if sampler is not None:
        return sampler
    shape = (-1, *policy.action_space.shape)  # type: ignore[misc]
    return functools.partial(_sb3_actions, policy, shape=shape)


def gaussian_mlp_sampler(policy: ActorCriticPolicy) -> ActionSampler | None:
    """SB3's Gaussian MLP actor on the CPU without module calls and distribution objects, or None for other actors.

    For flat (non-image) Box observations, a ``FlattenExtractor`` and a Gaussian head, SB3's
    ``get_distribution(obs).get_actions()`` is ``obs.float()``, the flatten, each layer of
    ``mlp_extractor.policy_net`` and ``action_net``, then ``th.normal(mean, std)`` with
    ``std = log_std.exp()``, which fills a new tensor by ``normal_``, then ``mul_(std).add_(mean)``.
    The same operations run here on the same inputs, so they give the same bits:

    - the cast to float32 and the flatten;
    - each layer's own ``forward`` (what ``layer(x)`` runs without hooks, which
      :func:`~sb3_trpo.common.rollout_gate.recognised_policy` checks; a ``Linear`` layer's ``F.linear`` with the parameters
      read from the module's dict at every step), in inference mode, which skips autograd's
      bookkeeping and calls the same kernels as SB3's ``no_grad``; with MKL on one thread
      where :func:`one_thread_gives_the_same_bits` shows that this computes what torch's
      thread count computes for the batch's shapes (with more threads, each small product
      wakes a sleeping OpenMP worker, which costs more than the environment step);
    - ``normal_`` on a tensor of the mean's shape from the same generator (the same draws in
      the same order), then the float32 product and sum in NumPy (IEEE multiplication and
      addition, rounded once each, as ``mul_`` and ``add_``).

    ``Normal`` refuses a NaN mean or a standard deviation that is not positive: such a step
    is handed, before anything is drawn, to SB3's own ``get_distribution(obs).get_actions()``,
    which draws or raises exactly as SB3 would.
    """
    if not (
        policy.device.type == "cpu"
        and type(policy.action_dist) is DiagGaussianDistribution
        and isinstance(policy.observation_space, spaces.Box)
        and not (policy.normalize_images and is_image_space(policy.observation_space))
        and type(policy.pi_features_extractor) is FlattenExtractor
        and type(policy.mlp_extractor.policy_net) is nn.Sequential
    ):
        return None
    flatten = policy.pi_features_extractor.flatten
    modules = [*policy.mlp_extractor.policy_net, policy.action_net]
    layers = [_linear(module._parameters) if type(module) is nn.Linear else module.forward for module in modules]
    weights = [module._parameters for module in modules if type(module) is nn.Linear]
    own_parameters = policy._parameters
    shape = (-1, *policy.action_space.shape)  # type: ignore[misc]
    set_mkl_threads = mkl_thread_setter()
    one_thread: dict[tuple, bool] = {}
    noise: dict[tuple[int, ...], th.Tensor] = {}

    def sample(observations: Observations) -> np.ndarray:
        with th.inference_mode():
            latent = flatten.forward(th.as_tensor(observations).float())
            previous_threads = None
            threads = th.get_num_threads()
            if set_mkl_threads is not None and threads > 1:
                layout = (threads, latent.shape, latent.stride(), *_layouts(weights))
                if layout not in one_thread:
                    one_thread[layout] = one_thread_gives_the_same_bits(modules, latent, set_mkl_threads)
                if one_thread[layout]:
                    previous_threads = set_mkl_threads(1)
            try:
                for layer in layers:
                    latent = layer(latent)
            finally:
                if previous_threads is not None:
                    set_mkl_threads(previous_threads)  # type: ignore[misc]
            mean = latent.numpy()
            std = own_parameters["log_std"].exp().numpy()  # type: ignore[union-attr]
            if np.isnan(mean).any() or not (std > 0).all():
                return _sb3_actions(policy, observations, shape)
            if mean.shape not in noise:
                noise[mean.shape] = th.empty(mean.shape)
            standard_normal = noise[mean.shape].normal_().numpy()
        return (standard_normal * std + mean).reshape(shape)

    return sample


def _sb3_actions(policy: ActorCriticPolicy, observations: Observations, shape: tuple[int, ...]) -> np.ndarray:
    """SB3's own ``get_distribution(obs).get_actions()``, which draws or raises as SB3 does."""
    with th.no_grad():
        actions = policy.get_distribution(obs_as_tensor(observations, policy.device)).get_actions()
    return actions.cpu().numpy().reshape(shape)


def _linear(parameters: dict[str, nn.Parameter | None]) -> Callable[[th.Tensor], th.Tensor]:
    """``nn.Linear.forward`` with the weight and bias read from the module's parameter dict at every call."""

    def linear(latent: th.Tensor) -> th.Tensor:
        return F.linear(latent, parameters["weight"], parameters["bias"])  # type: ignore[arg-type]

    return linear


def _layouts(weights: list[dict[str, nn.Parameter | None]]) -> list[tuple]:
    return [(w["weight"].shape, w["weight"].stride(), w["bias"] is not None) for w in weights]  # type: ignore[union-attr]


def one_thread_gives_the_same_bits(modules: list[nn.Module], latent: th.Tensor, set_mkl_threads: Callable[[int], int]) -> bool:
    """Whether ``modules`` give the same bits with MKL on one thread as on torch's thread count, for inputs like ``latent``.

    MKL picks its kernel, and how it splits the product among threads, from the shapes, the
    memory layout and the thread count, not from the values (for 7 rows on 2 threads it splits
    the rows and rounds differently). So the layers are computed on random values laid out as
    the real ones, with both settings: different kernels would give different bits. The other
    layers' element-wise kernels split a tensor among threads only from
    ``at::internal::GRAIN_SIZE`` (32,768) elements; larger outputs are refused.
    """
    generator = th.Generator().manual_seed(0)

    def like(tensor: th.Tensor) -> th.Tensor:
        return th.empty_strided(tensor.shape, tensor.stride()).copy_(th.randn(tensor.shape, generator=generator))

    default = like(latent)
    one = default.clone()
    for module in modules:
        if type(module) is nn.Linear:
            weight = like(module.weight)
            bias = None if module.bias is None else like(module.bias)
            default = F.linear(default, weight, bias)
            previous = set_mkl_threads(1)
            try:
                one = F.linear(one, weight, bias)
            finally:
                set_mkl_threads(previous)
        else:
            default, one = module(default), module(one)
        if default.numel() >= ELEMENTWISE_GRAIN_SIZE or not th.equal(default, one):
            return False
    return True
