"""Where the workers of a study meet: opening its storage safely, and checking a run's input first.

Workers started together on one storage open it under a lock (:func:`storage_lock`), record
heartbeats so that the trials of a dead worker are failed and run again (:func:`open_storage`),
and enqueue a config entry once (:func:`enqueue_unless_measured`). The checks stop bad input
before any training (:func:`check_env_id`, :func:`check_storage`, :func:`check_fault_options`).
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gymnasium as gym
import optuna
import sqlalchemy
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import TrialState
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import NullPool


def check_env_id(env_id: str) -> None:
    """Raise a ``ValueError`` naming ``env_id`` and the closest registered ids unless Gymnasium knows it."""
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"unknown environment id {env_id!r}{hint}")


def check_storage(url: str | None) -> None:
    """
    Raise a ``ValueError`` naming the problem unless ``url`` is a storage Optuna can open.

    Connects once and disconnects without writing, so that bad input stops a run before
    any training and leaves an existing study as it was. ``None`` (in-memory) and
    rl-zoo3's journal files (``*.log``) need no check.

    :param url: SQLAlchemy URL of the Optuna RDB storage, e.g. ``sqlite:///study.db``
        or ``postgresql://user:password@host/database``
    """
    if url is None or url.endswith(".log"):
        return
    try:
        parsed = sqlalchemy.make_url(url)
    except ArgumentError as error:
        raise ValueError(
            f"malformed storage URL {url!r} ({error}); expected e.g. sqlite:///study.db or postgresql://user@host/db"
        ) from error
    shown = parsed.render_as_string(hide_password=True)
    # A black-holed host would otherwise wait for the operating system's TCP timeout.
    connect_args = {} if parsed.get_backend_name() == "sqlite" else {"connect_timeout": 10}
    try:
        engine = sqlalchemy.create_engine(parsed, connect_args=connect_args)
    except NoSuchModuleError as error:
        raise ValueError(f"storage URL {shown!r} names an unknown database {parsed.drivername!r}") from error
    except ArgumentError as error:
        raise ValueError(f"malformed storage URL {shown!r}: {error}") from error
    except ImportError as error:
        raise ValueError(f"storage URL {shown!r} needs a database driver that is not installed: {error}") from error
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).strip()
        raise ValueError(f"cannot reach storage {shown!r}: {reason}") from error
    finally:
        engine.dispose()


# Seconds between the heartbeats of a running trial, and without one before it counts as dead.
DEFAULT_HEARTBEAT_INTERVAL = 60
DEFAULT_GRACE_PERIOD = 180
# A trial whose worker died or was stopped is run again at most this many times: a trial
# that kills its worker every time (out of memory, say) must not take the study with it.
DEFAULT_MAX_RETRY = 3
# pg_advisory_lock's key (any 64-bit integer; these are the bytes of "sb3_trpo").
_POSTGRESQL_LOCK_KEY = 0x7362335F7472706F
_LOCK_TIMEOUT = 600


@contextmanager
def storage_lock(url: str) -> Iterator[None]:
    """
    Hold, across processes and machines, a lock on the storage ``url`` of an Optuna study.

    Workers started together on an empty storage would otherwise race to create Optuna's
    tables, or each enqueue the same trial. PostgreSQL: an advisory lock; MySQL and
    MariaDB: ``GET_LOCK``; both are released by the server when a holder dies. SQLite
    and rl-zoo3's journal files (``*.log``): a lock file beside the database file
    (Optuna's, broken when it has not changed for 30 s). In-memory SQLite and other
    databases: no lock.

    :param url: SQLAlchemy URL of an Optuna RDB storage, or the path of a journal file
    """
    if url.endswith(".log"):
        path: str | None = url
    else:
        parsed = sqlalchemy.make_url(url)
        backend = parsed.get_backend_name()
        if backend in ("postgresql", "mysql", "mariadb"):
            with _database_lock(parsed, backend):
                yield
            return
        path = parsed.database if backend == "sqlite" and parsed.database not in (None, "", ":memory:") else None
    if path is None:
        yield
        return
    # Not the journal's own lock file (path + ".lock"): its writes happen inside this lock.
    lock = JournalFileOpenLock(f"{path}.setup")
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextmanager
def _database_lock(url: Any, backend: str) -> Iterator[None]:
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            if backend == "postgresql":
                key: dict[str, Any] = {"key": _POSTGRESQL_LOCK_KEY}
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), key)
                unlock = "SELECT pg_advisory_unlock(:key)"
            else:
                key = {"key": f"sb3_trpo:{url.database}"}
                acquire = sqlalchemy.text("SELECT GET_LOCK(:key, :timeout)")
                if connection.execute(acquire, {**key, "timeout": _LOCK_TIMEOUT}).scalar() != 1:
                    raise TimeoutError(f"storage lock {key['key']!r} not acquired in {_LOCK_TIMEOUT} s")
                unlock = "SELECT RELEASE_LOCK(:key)"
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text(unlock), key)
                connection.commit()
    finally:
        engine.dispose()


def check_fault_options(heartbeat_interval: int, grace_period: int, max_retry: int, as_options: bool = False) -> None:
    """
    Raise a ``ValueError`` naming the parameter and its range unless the arguments of
    :func:`open_storage` and :class:`SignalStop` are usable.

    :param heartbeat_interval: must be positive
    :param grace_period: must exceed ``heartbeat_interval``
    :param max_retry: an integer >= 0
    :param as_options: name the parameters as the command-line options (``--max-retry``)
    """

    def name(parameter: str) -> str:
        return "--" + parameter.replace("_", "-") if as_options else parameter

    if not 0 < heartbeat_interval < grace_period:
        raise ValueError(
            f"{name('grace_period')} ({grace_period}) must exceed {name('heartbeat_interval')} ({heartbeat_interval}), "
            "and both be positive: a trial that records a heartbeat in time must never count as dead"
        )
    if isinstance(max_retry, bool) or not isinstance(max_retry, int) or max_retry < 0:
        raise ValueError(
            f"{name('max_retry')} must be an integer >= 0 (the times a trial whose worker died or was stopped "
            f"is run again; 0: never), got {max_retry!r}"
        )


def open_storage(
    url: str,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL,
    grace_period: int = DEFAULT_GRACE_PERIOD,
    max_retry: int = DEFAULT_MAX_RETRY,
) -> optuna.storages.BaseStorage:
    """
    Open the storage of a study that several workers share; safe when they start together.

    An RDB storage (SQLite, PostgreSQL, MySQL) is opened with Optuna's heartbeat: a running
    trial records a heartbeat every ``heartbeat_interval`` seconds; when a worker starts a
    trial, the trials of the study without a heartbeat for ``grace_period`` seconds (their
    worker died) become FAIL and are enqueued again with the same parameters, up to
    ``max_retry`` times. A path ending in ``.log`` is opened as rl-zoo3 does, an
    Optuna journal file, which has no heartbeat.

    :param url: SQLAlchemy URL of the RDB storage, or the path of a journal file
    :param heartbeat_interval: seconds between heartbeats of a running trial
    :param grace_period: seconds without a heartbeat after which a running trial is failed
    :param max_retry: how many times a trial of a dead worker is run again (0: never)
    :return: the storage, for ``optuna.create_study(storage=...)``
    :raises ValueError: for the values :func:`check_fault_options` refuses
    """
    check_fault_options(heartbeat_interval, grace_period, max_retry)
    with storage_lock(url):
        if url.endswith(".log"):
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(url))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
            )


def enqueue_unless_measured(study: optuna.Study, params: dict[str, Any]) -> bool:
    """
    Enqueue a trial of ``params`` unless one is COMPLETE, PRUNED, RUNNING or WAITING.

    A FAIL trial does not count: it measured nothing. Call it inside :func:`storage_lock`
    when workers may enqueue the same parameters at the same time.

    :return: whether the trial was enqueued
    """
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    # An enqueued trial keeps its parameters in "fixed_params" until it runs.
    if any(trial.system_attrs.get("fixed_params", trial.params) == params for trial in study.get_trials(states=states)):
        return False
    study.enqueue_trial(params)
    return True
