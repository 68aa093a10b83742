"""Errors that name what to do: unknown policy names and zips that the algorithm cannot load.

A zip that SB3's ``save`` wrote holds no algorithm name. Which algorithm saved it is read from
its ``data`` entry, the saved attributes of the model:

- each family of the package's algorithms saves hyperparameters no other SB3 or sb3-contrib
  algorithm saves (:data:`FAMILIES`): the conjugate-gradient trust-region family
  (``TrustRegionAlgorithm``'s subclasses, and sb3-contrib's ``TRPO``) ``cg_max_steps`` and
  ``n_critic_updates``, ACKTR ``kfac_damping`` and ``critic_target_kl``; a zip of the loading
  algorithm's family loads, a zip of the other family is refused naming it;
- any other zip is refused, naming the Stable-Baselines3 or sb3-contrib algorithms whose policy
  aliases hold the zip's ``policy_class``; of those sharing a policy class, PPO and its variants
  are told from A2C by the ``clip_range`` they save, A2C from algorithms that fit their critic
  separately by ``n_critic_updates``; a zip of none of them (a custom algorithm) is refused
  naming its policy class.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import pathlib
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import sb3_contrib
import stable_baselines3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.save_util import json_to_data, open_path

# Saved by every conjugate-gradient trust-region algorithm (set by its constructor) and by no other SB3 or
# sb3-contrib algorithm.
TRUST_REGION_KEYS = ("cg_max_steps", "n_critic_updates")
ACKTR_KEYS = ("kfac_damping", "critic_target_kl")
# Each family of the package's algorithms, by the hyperparameters its zips hold, and who saves them.
FAMILIES: dict[tuple[str, ...], tuple[str, str]] = {
    TRUST_REGION_KEYS: (
        "TRPO, NPG, MaskableTRPO, RecurrentTRPO or sb3-contrib's TRPO",
        "TRPO, NPG, MaskableTRPO or RecurrentTRPO",
    ),
    ACKTR_KEYS: ("ACKTR", "ACKTR"),
}
# Hyperparameters that tell apart algorithms sharing a policy class: PPO's family and A2C (and
# A2C and algorithms fitting their critic separately, such as this package's ACKTR).
TELLING_KEYS = ("clip_range", "n_critic_updates")


def unknown_policy_error(algorithm: str, name: str, aliases: Mapping[str, type]) -> ValueError:
    """
    The error for a policy name that ``algorithm`` does not know.

    :param algorithm: the algorithm's class name
    :param name: the policy name given
    :param aliases: the algorithm's ``policy_aliases``
    :return: a ``ValueError`` that lists the valid names and, for an LSTM policy on an algorithm
        without one, points to ``RecurrentTRPO``
    """
    valid = ", ".join(aliases)
    hint = ""
    if "lstm" in name.lower() and not any("lstm" in alias.lower() for alias in aliases):
        hint = f" {algorithm} has no recurrent policy: for LSTM policies use RecurrentTRPO({name!r}, env) (from sb3_trpo)."
    return ValueError(f"Policy {name} unknown for {algorithm}.{hint} Valid policy names: {valid}.")


@contextlib.contextmanager
def _opened(path: str | pathlib.Path | io.BufferedIOBase) -> Iterator[io.BufferedIOBase]:
    """The zip as SB3 opens it (``.zip`` appended if missing); a file object given is left where it was."""
    file = open_path(path, "r", verbose=0, suffix="zip")
    start = file.tell()
    try:
        yield file
    finally:
        if isinstance(path, (str, pathlib.Path)):
            file.close()
        else:
            file.seek(start)


def _damaged(path: Any, what: str) -> ValueError:
    return ValueError(
        f"The model file {path} is damaged: {what}. It was probably truncated or altered after saving "
        "(an interrupted save or copy); save the model again or use another copy."
    )


def read_saved_data(path: str | pathlib.Path | io.BufferedIOBase, custom_objects: dict[str, Any] | None = None) -> dict:
    """
    The ``data`` entry of a zip saved by SB3's ``save``, its JSON not yet unpickled.

    :param path: the zip, as ``BaseAlgorithm.load`` takes it
    :param custom_objects: objects replacing saved entries, as ``BaseAlgorithm.load`` takes them
    :return: the saved attributes: name to JSON value (pickled objects stay as SB3 stored them)
    :raises ValueError: the file is not a whole zip, a member fails its checksum, or ``data`` or
        ``policy.pth`` is missing
    """
    with _opened(path) as file:
        try:
            with zipfile.ZipFile(file) as archive:
                names = archive.namelist()
                broken = archive.testzip()
                data = archive.read("data") if "data" in names else None
        except (zipfile.BadZipFile, EOFError, OSError) as error:
            raise _damaged(path, f"it is not a complete zip file ({error})") from None
    if broken is not None:
        raise _damaged(path, f"its member {broken!r} fails its checksum")
    missing = [name for name in ("data", "policy.pth") if name not in names]
    if missing or data is None:
        raise _damaged(path, f"it lacks {' and '.join(missing)}, which every saved model has")
    try:
        saved = json.loads(data)
    except ValueError:
        raise _damaged(path, "its data entry is not valid JSON") from None
    return {**saved, **(custom_objects or {})}


def _saves(cls: type[BaseAlgorithm], keys: tuple[str, ...]) -> bool:
    """Whether ``cls`` takes (and so saves) every hyperparameter of ``keys``."""
    return all(key in inspect.signature(cls).parameters for key in keys)


def _library_algorithms() -> list[type[BaseAlgorithm]]:
    classes = [getattr(module, name) for module in (stable_baselines3, sb3_contrib) for name in module.__all__]
    return [cls for cls in classes if isinstance(cls, type) and issubclass(cls, BaseAlgorithm)]


def _saved_policy_class(saved: dict) -> Any:
    """The zip's policy class, unpickled as SB3's load does; ``None`` where it cannot be."""
    policy_class = saved.get("policy_class")
    if not isinstance(policy_class, dict):
        return policy_class
    try:
        return json_to_data(json.dumps({"policy_class": policy_class}))["policy_class"]
    except Exception:
        return None


def saving_algorithms(saved: dict) -> list[type[BaseAlgorithm]]:
    """
    The Stable-Baselines3 and sb3-contrib algorithms that may have saved a zip.

    :param saved: the zip's data, as :func:`read_saved_data` returns it
    :return: the algorithms, trust-region ones aside, whose policy aliases hold the saved policy
        class and that save each of :data:`TELLING_KEYS` exactly when the zip has it; empty when none does
    """
    policy_class = _saved_policy_class(saved)
    candidates = [
        cls
        for cls in _library_algorithms()
        if policy_class in cls.policy_aliases.values() and not _saves(cls, TRUST_REGION_KEYS)
    ]
    return [cls for cls in candidates if all(_saves(cls, (key,)) == (key in saved) for key in TELLING_KEYS)]


def _library(cls: type) -> str:
    return cls.__module__.split(".")[0]


def check_saved_by(algorithm: str, keys: tuple[str, ...], path: Any, saved: dict) -> None:
    """
    Refuse a zip that no algorithm of the loading algorithm's family saved, naming the algorithm that did.

    :param algorithm: the class name of the algorithm loading the zip
    :param keys: the hyperparameters every zip of its family holds (a key of :data:`FAMILIES`)
    :param path: the zip, for the message
    :param saved: the zip's data, as :func:`read_saved_data` returns it
    :raises ValueError: the zip lacks a key of ``keys``
    """
    if all(key in saved for key in keys):
        return
    family = next((names for family_keys, names in FAMILIES.items() if all(key in saved for key in family_keys)), None)
    found = saving_algorithms(saved)
    if family is not None:
        told = f"it was saved by {family[0]}: load it with {family[1]} (from sb3_trpo)"
    elif found:
        names = " or ".join(f"{_library(cls)}'s {cls.__name__}" for cls in found)
        loaders = " or ".join(f"{cls.__name__}.load(...) (from {_library(cls)} import {cls.__name__})" for cls in found)
        told = f"it was saved by {names}: load it with {loaders}"
    else:
        policy_class = _saved_policy_class(saved)
        policy = f"{policy_class.__module__}.{policy_class.__qualname__}" if isinstance(policy_class, type) else "unknown"
        told = f"load it with the algorithm class that saved it (its policy class: {policy})"
    raise ValueError(
        f"{path} was not saved by {FAMILIES[keys][0]} (its data has no {' or '.join(keys)}), "
        f"so {algorithm} cannot load it; {told}."
    )


@contextlib.contextmanager
def plain_load_errors(path: Any) -> Iterator[None]:
    """Turn torch's errors on a damaged ``.pth`` member into one that says so (never suggesting ``weights_only=False``)."""
    try:
        yield
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as error:
        raise _damaged(path, f"a weights file (.pth) inside it cannot be read ({type(error).__name__})") from None
    except RuntimeError as error:
        if "PytorchStreamReader" not in str(error):
            raise
        raise _damaged(path, "a weights file (.pth) inside it is not a complete torch archive") from None
