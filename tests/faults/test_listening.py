"""A local run listens on loopback only: Ray's own servers (GCS, raylet, object manager, agents, every
worker's gRPC server), the learners' torch.distributed store and gloo sockets, and the weight-broadcast
group's store.

The run is started the way `python -m sapo_ray.main` starts it (`init_ray` with no cluster address,
then `Trainer.setup` with `rollout.weight_sync=broadcast`, then one weight sync), in a subprocess of its
own so that Ray starts fresh under the environment each case gives it; that subprocess lists the
listening TCP sockets of itself and of every process it started. The session `ray_cluster` fixture is
not used: it is started by conftest.py, not by the trainer.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
# Processes a run must have started, so that an empty or partial listing cannot pass.
EXPECTED = ("gcs_server", "raylet", "ray::RolloutWorker", "ray::PolicyWorker")


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # a dual-stack socket bound to ::ffff:127.0.0.1
    return addr.is_loopback


def listening_sockets() -> tuple[list[dict], list[str]]:
    """Every listening TCP socket of this process and its descendants, and those processes' names."""
    import ray  # noqa: F401  (puts Ray's bundled psutil on the path)
    import psutil

    me = psutil.Process()
    found, names = [], []
    for proc in [me, *me.children(recursive=True)]:
        try:
            cmdline = proc.cmdline()
            conns = proc.net_connections(kind="inet")
        except psutil.Error:  # ended meanwhile (a short-lived helper)
            continue
        name = Path(cmdline[0].strip()).name if cmdline else ""  # "raylet", "ray::PolicyWorker", ...
        names.append(name)
        found += [{"ip": c.laddr.ip, "port": c.laddr.port, "pid": proc.pid, "process": name}
                  for c in conns if c.status == psutil.CONN_LISTEN]
    return found, names


def probe(run_dir: str) -> dict:
    """Start a local run's actors, sync the weights once, list the listeners, tear down."""
    import ray

    sys.path.insert(0, str(REPO / "tests"))
    from helpers import TINY_OVERRIDES

    from sapo_ray.config import compose_config
    from sapo_ray.main import init_ray
    from sapo_ray.trainer import Trainer

    cfg = compose_config("model.path=bundled:tiny-vlm", f"trainer.run_dir={run_dir}", "trainer.steps=1",
                         "algorithm=grpo", "rollout.weight_sync=broadcast", *TINY_OVERRIDES)
    assert init_ray(cfg), "a local Ray should have been started"
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        synced = trainer.rollouts.weight_sync()["sync/bytes"]
        sockets, processes = listening_sockets()
    finally:
        trainer.close()
        ray.shutdown()
    return {"sockets": sockets, "processes": processes, "synced_bytes": synced}


def test_tcp_store_serves_its_listener_only():
    """The store a group's rank 0 serves listens where its clients are told to connect, nowhere else."""
    import ray  # noqa: F401  (puts Ray's bundled psutil on the path)
    import psutil

    from sapo_ray.net import LOOPBACK, listen, tcp_store

    def listening() -> set[tuple[str, int]]:
        return {(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN}

    before = listening()
    listener = listen(LOOPBACK)
    port = listener.getsockname()[1]
    timeout = timedelta(seconds=30)
    with ThreadPoolExecutor(1) as pool:  # the server waits in its constructor until the client has joined
        serving = pool.submit(tcp_store, LOOPBACK, port, 2, listener, timeout)
        client = tcp_store(LOOPBACK, port, 2, timeout=timeout)
        server = serving.result(timeout=60)
    client.set("key", "value")
    assert server.get("key") == b"value"
    assert listening() - before == {(LOOPBACK, port)}


@pytest.mark.parametrize("cluster_env", [None, "1"], ids=["env-unset", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1"])
def test_local_run_listens_on_loopback_only(tmp_path, cluster_env):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    if cluster_env is not None:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = cluster_env
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), RAY_USAGE_STATS_ENABLED="0",
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out = tmp_path / "listening.json"
    proc = subprocess.run([sys.executable, __file__, str(tmp_path / "run"), str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())

    missing = [name for name in EXPECTED if name not in result["processes"]]
    assert not missing, f"the run's process tree lacks {missing}: {result['processes']}"
    assert result["synced_bytes"] > 0
    # A learner rank serves at least its gRPC server, its group's store and the weight group's store.
    assert sum(s["process"] == "ray::PolicyWorker" for s in result["sockets"]) >= 3, result["sockets"]
    exposed = [f"{s['process']} (pid {s['pid']}) on {s['ip']}:{s['port']}"
               for s in result["sockets"] if not is_loopback(s["ip"])]
    assert not exposed, "listening beyond loopback:\n" + "\n".join(sorted(exposed))


if __name__ == "__main__":
    Path(sys.argv[2]).write_text(json.dumps(probe(sys.argv[1])))
