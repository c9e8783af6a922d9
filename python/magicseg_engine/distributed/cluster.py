"""Reaching Ray: the import check, a bounded connection, and what the cluster offers.

`ray.init(address=...)` retries an unreachable or silent head for minutes without a word, so
the connection is first probed with a plain TCP connect and then made in a helper thread that
is abandoned after `timeout_s`: either way the user gets one line within a known time.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from magicseg_engine.errors import UsageError

INSTALL_HINT = "Ray is not installed: pip install 'magicseg-engine[ray]' (it brings ray[data])"
DEFAULT_CONNECT_TIMEOUT_S = 30.0
_GCS_DEFAULT_PORT = 6379  # what `ray start --head` listens on unless told otherwise


def require_ray():
    """The `ray` module with Ray Data, or a UsageError naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (a bare `ray` install lacks the Data library)
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """Where to probe `address` (`host:port`, `ray://host:port`), or None for `auto`/`local`."""
    if address in ("auto", "local"):
        return None
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"--ray-address {address!r} has a bad port; use HOST:PORT, e.g. 10.0.0.1:6379") from None
    if not parts.hostname:
        raise UsageError(f"--ray-address {address!r} names no host; use HOST:PORT, e.g. 10.0.0.1:6379")
    return parts.hostname, port or _GCS_DEFAULT_PORT


def _probe(address: str, timeout_s: float) -> None:
    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout_s):
            pass
    except OSError as err:
        reason = "no answer" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise UsageError(
            f"cannot reach the Ray head at {address} ({reason} within {timeout_s:g} s); start it with "
            "`ray start --head` there, or check the address and that the port is open"
        ) from None


def connect(address: str | None, *, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
            num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at `address`, or start a local instance when it is None.

    Returns True when this call started or joined Ray (the caller shuts it down after the run),
    False when the process was already connected, as under a test that started Ray itself.
    """
    ray = require_ray()
    if ray.is_initialized():
        return False
    if timeout_s <= 0:
        raise UsageError(f"--ray-timeout must be positive, got {timeout_s:g}")
    kwargs: dict = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address:
        _probe(address, timeout_s)
        kwargs["address"] = address
    elif num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    outcome: dict[str, BaseException | None] = {}

    def init() -> None:
        try:
            ray.init(**kwargs)
            outcome["error"] = None
        except BaseException as err:  # reported on the caller's thread
            outcome["error"] = err

    if address:
        # A daemon thread: if the head never answers, the process can still exit.
        thread = threading.Thread(target=init, name="ray-connect", daemon=True)
        thread.start()
        thread.join(timeout_s)
    else:
        # Ray bounds the start of a local instance itself, and in the main thread it also
        # installs its signal handlers.
        init()
    where = f"the Ray cluster at {address}" if address else "a local Ray instance"
    if "error" not in outcome:
        raise UsageError(f"could not join {where} within {timeout_s:g} s; check that `ray start --head` "
                         "runs there with the same Ray version, or raise --ray-timeout")
    err = outcome["error"]
    if err is not None:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"could not join {where}: {first}")
    return True


def shutdown() -> None:
    ray = require_ray()
    if ray.is_initialized():
        ray.shutdown()


@dataclass(frozen=True)
class ClusterResources:
    cpus: float
    gpus: float
    nodes: int


def cluster_resources() -> ClusterResources:
    ray = require_ray()
    total = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return ClusterResources(float(total.get("CPU", 0)), float(total.get("GPU", 0)), nodes)
