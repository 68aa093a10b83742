"""What the batched loop's callbacks see, computed only when read; and the watch on the policy's weights.

SB3's loop gives its callbacks its local variables (``self.locals``), among them the
observation tensor, values and log-probabilities that its per-step ``policy(obs_tensor)``
computed. The batched loop does not compute them per step: it gives :class:`Deferred`
entries in a :class:`LazyLocals`, a dict that computes an entry, by SB3's own per-step
computation, the first time anything reads it. :class:`PolicyWatch` tells whether a callback
wrote the policy's weights, and gives back the weights the earlier steps were taken with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from torch import nn

from sb3_trpo.common.exact_sampler import write_marks

_PENDING = object()


class Deferred:
    """A value computed by ``compute`` the first time :meth:`get` is called, and kept."""

    __slots__ = ("_compute", "_value")

    def __init__(self, compute: Callable[[], Any]):
        self._compute: Callable[[], Any] | None = compute
        self._value: Any = _PENDING

    @property
    def computed(self) -> bool:
        """Whether :meth:`get` has computed the value."""
        return self._value is not _PENDING

    def get(self) -> Any:
        """The value (computed now if it was not)."""
        if self._value is _PENDING:
            assert self._compute is not None
            self._value, self._compute = self._compute(), None
        return self._value


class LazyLocals(dict):
    """A dict whose :class:`Deferred` values are computed when a value is read, by any means.

    Reading a key, ``get``, ``items``, ``values``, copying, comparing, pickling or merging it
    into another dict (``dict(x)``, ``{**x}``, ``d.update(x)``: overriding ``__iter__`` makes
    Python read each value through ``__getitem__``) give the computed values; keys, ``in``
    and ``len`` compute nothing. :meth:`update` from another :class:`LazyLocals` copies its
    entries uncomputed.
    """

    def __getitem__(self, key: Any) -> Any:
        value = dict.__getitem__(self, key)
        if type(value) is Deferred:
            value = value.get()
            dict.__setitem__(self, key, value)
        return value

    def _compute_all(self) -> None:
        for key in list(dict.keys(self)):
            self[key]

    def __iter__(self) -> Iterator[Any]:
        return dict.__iter__(self)

    def update(self, *args: Any, **kwargs: Any) -> None:
        if len(args) == 1 and not kwargs and type(args[0]) is LazyLocals:
            dict.update(self, dict.items(args[0]))
        else:
            dict.update(self, *args, **kwargs)

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default  # noqa: SIM401 (dict.get would return a Deferred)

    def items(self) -> Any:
        self._compute_all()
        return dict.items(self)

    def values(self) -> Any:
        self._compute_all()
        return dict.values(self)

    def pop(self, key: Any, *default: Any) -> Any:
        if key in self:
            self[key]
        return dict.pop(self, key, *default)

    def popitem(self) -> tuple[Any, Any]:
        self._compute_all()
        return dict.popitem(self)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else dict.setdefault(self, key, default)

    def copy(self) -> dict[Any, Any]:
        self._compute_all()
        return dict(dict.items(self))

    def __eq__(self, other: object) -> bool:
        self._compute_all()
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None

    def __repr__(self) -> str:
        self._compute_all()
        return dict.__repr__(self)

    def __or__(self, other: Any) -> Any:
        return self.copy() | other

    def __ror__(self, other: Any) -> Any:
        return other | self.copy()

    def __reduce_ex__(self, protocol: Any) -> Any:
        self._compute_all()
        return dict.__reduce_ex__(self, protocol)


def callbacks_in(callback: BaseCallback) -> list[BaseCallback]:
    """``callback`` and every callback among its attributes, and in lists or tuples there, and theirs (children of
    lists, events, evaluations)."""
    found: dict[int, BaseCallback] = {}
    stack: list[Any] = [callback]
    while stack:
        item = stack.pop()
        if isinstance(item, BaseCallback):
            if id(item) not in found:
                found[id(item)] = item
                stack.extend(vars(item).values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return list(found.values())


def install_lazy_locals(callback: BaseCallback) -> None:
    """Give every callback in ``callback``'s tree a :class:`LazyLocals` in place of its ``locals`` dict.

    Callbacks that shared one dict (SB3 hands the root's to its children) share the new one. A
    callback this misses keeps its plain dict, into which ``update_locals`` copies the computed
    values (see :class:`LazyLocals`): it sees the same values, computed for it.
    """
    replaced: dict[int, LazyLocals] = {}
    for member in callbacks_in(callback):
        current = member.locals
        if type(current) is dict:
            if id(current) not in replaced:
                replaced[id(current)] = LazyLocals(current)
            member.locals = replaced[id(current)]


class PolicyWatch:
    """Which of a policy's weights were written since the watch started, and the values they started with.

    Writes are seen through torch's version counters and the tensors' memory
    (:func:`~sb3_trpo.common.exact_sampler.write_marks`): in-place operations, ``load_state_dict``,
    ``set_parameters``, optimizer steps and ``.data =`` assignments. Writes that torch does not
    count (into ``.data`` or a NumPy view) are found afterwards by :meth:`unseen_actor_writes`,
    for the actor's weights (the critic's are written by its background fit meanwhile). The
    policy's modules compute the same in training and evaluation mode
    (:data:`~sb3_trpo.common.rollout_gate.KNOWN_MODULES`), so its mode is not watched.

    :param policy: the policy to watch
    :param critic: the critic's parameters
    :param critic_pending: whether a background fit may still be writing them: their writes are
        then the fit's, not watched until :meth:`settle`
    """

    def __init__(self, policy: nn.Module, critic: list[nn.Parameter], critic_pending: bool):
        self._tensors = [*policy.parameters(), *policy.buffers()]
        critic_ids = {id(parameter) for parameter in critic}
        self._critic = {index for index, tensor in enumerate(self._tensors) if id(tensor) in critic_ids}
        self._unwatched = set(self._critic) if critic_pending else set()
        self._marks = write_marks(self._tensors)
        self._start = [tensor.detach().clone() for tensor in self._tensors]

    def written(self) -> list[int]:
        """The indices of the watched weights written since the start."""
        marks = write_marks(self._tensors)
        if marks == self._marks:
            return []
        pairs = enumerate(zip(self._marks, marks, strict=True))
        return [index for index, (old, new) in pairs if old != new and index not in self._unwatched]

    def critic_written_during_fit(self) -> bool:
        """Whether this process wrote the critic's weights while its background fit may still be writing them.

        The worker process writes them through shared memory, which leaves this process's version
        counters as they were: a counted write here comes from the training process itself.
        """
        if not self._unwatched:
            return False
        marks = write_marks(self._tensors)
        return any(marks[index] != self._marks[index] for index in self._unwatched)

    def settle(self) -> None:
        """The critic's fit has finished: the critic's weights start from their values now, and are watched."""
        for index in self._unwatched:
            tensor = self._tensors[index]
            self._marks[index] = write_marks([tensor])[0]
            self._start[index] = tensor.detach().clone()
        self._unwatched = set()

    def unseen_actor_writes(self) -> bool:
        """Whether a weight outside the critic that the marks call unwritten no longer holds its start value."""
        written = set(self.written())
        return any(
            not th.equal(tensor, start)
            for index, (tensor, start) in enumerate(zip(self._tensors, self._start, strict=True))
            if index not in written and index not in self._critic
        )

    @contextlib.contextmanager
    def start_weights(self, written: list[int]) -> Iterator[None]:
        """Within it, the weights ``written`` hold their values at the start."""
        tensors = [self._tensors[index] for index in written]
        current = [tensor.data for tensor in tensors]
        for tensor, index in zip(tensors, written, strict=True):
            tensor.data = self._start[index]
        try:
            yield
        finally:
            for tensor, data in zip(tensors, current, strict=True):
                tensor.data = data
