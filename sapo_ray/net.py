"""Where the run's processes listen: loopback only in a local run, the node's own address on a cluster.

A local run (no `ray.address`, no RAY_ADDRESS) starts Ray with token authentication off, and neither
torch's TCP store nor gloo authenticates anyone: whoever reaches a port can run code or inject
tensors. So a local run listens on 127.0.0.1 only (`loopback_only` around `ray.init`), and every
torch.distributed store of the run serves a socket bound to the address its clients are given
(`listen` + `tcp_store`), which is 127.0.0.1 there and the node's address on a cluster.
"""

from __future__ import annotations

import contextlib
import os
import socket
from datetime import timedelta

import torch.distributed as dist

LOOPBACK = "127.0.0.1"
# Collective libraries pick their listening interface from these; without them gloo follows the
# hostname (often the external address) and NCCL's bootstrap takes the first non-loopback interface.
INTERFACE_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def loopback_interface() -> str | None:
    """The name of the interface holding 127.0.0.1 (`lo` on Linux, `lo0` on macOS), None if none does."""
    import ray  # noqa: F401  (Ray ships psutil on its own path)
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == LOOPBACK for a in addrs):
            return name
    return None


@contextlib.contextmanager
def loopback_only():
    """Around the `ray.init` that starts a local cluster: every process it starts listens on loopback.

    Ray 2.60 replaces `_node_ip_address="127.0.0.1"` by the machine's external address whenever
    `ray._private.ray_constants.ENABLE_RAY_CLUSTER` is true, which it is on Linux unless
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set before Ray was first imported; with an external node
    address the GCS, the raylet and every worker's gRPC server bind all interfaces and the agents that
    address. So the constant is cleared for the call, and the environment the Ray processes inherit
    (the raylet's, hence every worker's and every vLLM subprocess's) says the same and names the
    loopback interface for gloo and NCCL. The driver's own environment is restored afterwards.
    """
    import ray._private.ray_constants as ray_constants

    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    interface = loopback_interface()
    if interface is not None:
        env.update(dict.fromkeys(INTERFACE_ENV, interface))
    saved_env = {k: os.environ.get(k) for k in env}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(env)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def listen(host: str) -> socket.socket:
    """A TCP socket listening on `host` only, on a free port, for `tcp_store` to serve."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen()
    except OSError:
        sock.close()
        raise
    return sock


def tcp_store(host: str, port: int, world_size: int, listener: socket.socket | None = None,
              timeout: timedelta = timedelta(minutes=30)) -> dist.TCPStore:
    """The rendezvous store of a group: its server on the member holding `listener` (from `listen(host)`),
    a client of `host:port` on the others.

    torch's store server binds every interface whatever host it is given (both its backends, torch
    2.13); handed a listening socket it serves that one instead, and owns its descriptor from then on.
    """
    if listener is None:
        return dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    assert listener.getsockname()[1] == port, (listener.getsockname(), port)
    return dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout, master_listen_fd=listener.detach())
