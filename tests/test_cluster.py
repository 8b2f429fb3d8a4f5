"""The trainer on real Ray clusters: `ray job submit` (launch/submit.sh), a Hydra multirun sweep
compared with `sapo_ray.compare`, and a two-node cluster (two raylets on this machine) with the
rollout and learner actors pinned to different nodes by custom resources.

Each cluster here is started by the test with `ray start --block` in a process session of its own,
on ports picked free and with its own --temp-dir, and is stopped by signalling exactly that process
(then anything left in its session): never `ray stop`, which would kill every Ray on the machine
(other engineers' included). The heads run the dashboard (unlike the other tests' clusters): the
Jobs API and `ray.util.state` are served by it. The session `ray_cluster` fixture of conftest.py is not used here and
needs no shutdown: it is a separate in-process cluster on other ports; the trainer subprocesses get
an environment without RAY_ADDRESS so they never join it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from helpers import TINY_OVERRIDES, free_ports

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, and the `python` a Ray job runs


def tiny_overrides(model: str) -> list[str]:
    """One training step with the tiny sizes of the end-to-end tests (validation before and after it)."""
    return [f"model.path={model}", "trainer.steps=1", "trainer.export_hf=false", *TINY_OVERRIDES]


def child_env(multi_node: bool = False, **extra: str) -> dict[str, str]:
    """Environment of every process started here: no token auth, one thread each, no inherited cluster.

    Ray 2.60 refuses `ray start --address` (a second node) while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
    and with it =1 it advertises the machine's own address even when asked for 127.0.0.1: both
    raylets still live on this machine."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1",
               OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1" if multi_node else "0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", **extra)
    return env


def session_pids(sid: int) -> list[int]:
    """Processes whose session id is `sid` (a `ray start` started in a new session, and its children)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == sid:
                pids.append(int(entry.name))
    return pids


def tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


class LocalCluster:
    """Ray nodes started by this test with `ray start --block`, each in its own process session."""

    def __init__(self, multi_node: bool = False):
        # Short root: Ray's unix socket paths under it must stay below ~107 characters.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        self.env = child_env(multi_node)
        self.nodes: list[tuple[subprocess.Popen, Path]] = []
        self.gcs_address = self.dashboard_url = ""

    def _start(self, args: list[str], name: str, ports: list[int] | None = None) -> None:
        log = self.temp_dir / f"{name}.log"
        agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = ports or free_ports(6)
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}",
               "--disable-usage-stats", f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
               f"--metrics-export-port={metrics}", f"--node-manager-port={node_manager}",
               f"--object-manager-port={object_manager}", *args]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.temp_dir,
                                    start_new_session=True)
        self.nodes.append((proc, log))
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`ray start` ({name}) did not come up:\n{tail(log.read_text())}")
            time.sleep(0.5)

    def start_head(self, num_cpus: int, resources: dict | None = None, num_gpus: int = 0) -> None:
        # All nine ports drawn together: ports drawn in two batches may repeat (the first are closed again).
        gcs, dashboard, client, *node_ports = free_ports(9)
        self._start(["--head", f"--port={gcs}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
                     "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                     f"--ray-client-server-port={client}",
                     *([f"--resources={json.dumps(resources)}"] if resources else [])], "head", node_ports)
        self.gcs_address, self.dashboard_url = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
        self._wait(lambda: urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=5).status == 200,
                   "the dashboard to answer")

    def add_node(self, num_cpus: int, resources: dict, num_gpus: int = 0) -> None:
        self._start([f"--address={self.gcs_address}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
                     f"--resources={json.dumps(resources)}"], f"node{len(self.nodes)}")
        self._wait(lambda: len(self.alive_nodes()) == len(self.nodes), f"{len(self.nodes)} alive nodes")

    def alive_nodes(self) -> list:
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.dashboard_url, detail=True) if n.state == "ALIVE"]

    @staticmethod
    def _wait(ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    return
            except Exception as err:  # not up yet
                last = err
            else:
                last = None
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what} (last error: {last!r})")
            time.sleep(1)

    def stop(self) -> None:
        """Stop unfinished jobs, then each node (SIGTERM to `ray start --block` ends its processes);
        SIGKILL whatever is left in those sessions."""
        if self.dashboard_url:
            try:
                from ray.job_submission import JobSubmissionClient

                client = JobSubmissionClient(self.dashboard_url)
                for job in client.list_jobs():
                    if job.submission_id and not job.status.is_terminal():
                        client.stop_job(job.submission_id)
            except Exception as err:  # the cluster may already be gone
                print(f"could not stop jobs: {err!r}")
        for proc, _ in reversed(self.nodes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in reversed(self.nodes):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            for pid in session_pids(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if proc.poll() is None:
                proc.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{tail(log.read_text(), 30)}" for _, log in self.nodes if log.exists())


@pytest.fixture
def cluster():
    clusters: list[LocalCluster] = []

    def make(multi_node: bool = False) -> LocalCluster:
        clusters.append(LocalCluster(multi_node))
        return clusters[-1]

    yield make
    for c in clusters:
        c.stop()


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ray_job_submit(cluster, random_tiny_models, tmp_path):
    """launch/submit.sh against a head with the Jobs API (dashboard on): the job succeeds and writes metrics."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    head = cluster()
    head.start_head(num_cpus=2)
    run_dir, job_id = tmp_path / "run", f"sapo-test-{uuid.uuid4().hex[:8]}"
    env = {**head.env, "RAY_ADDRESS": head.dashboard_url, "SUBMIT_ARGS": f"--submission-id {job_id}"}
    proc = subprocess.run(["bash", str(REPO / "launch" / "submit.sh"), *tiny_overrides(random_tiny_models["vlm"]),
                           f"trainer.run_dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{tail(proc.stdout)}\n{tail(proc.stderr)}\n{head.logs()}"
    assert JobSubmissionClient(head.dashboard_url).get_job_status(job_id) == JobStatus.SUCCEEDED
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1]
    assert {"critic/score/mean", "actor/pg_loss", "val/accuracy"} <= set(rows[1])


def test_hydra_multirun_then_compare(random_tiny_models, tmp_path):
    """`-m algorithm=sapo,grpo`: two jobs, each in its own directory, each with its own local Ray;
    `sapo_ray.compare` on the sweep dir reports both algorithms."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "sapo_ray.main", "-m", "algorithm=sapo,grpo",
                           *tiny_overrides(random_tiny_models["vlm"]), f"hydra.sweep.dir={sweep}"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{tail(proc.stdout)}\n{tail(proc.stderr)}"
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0-sapo-seed0", "1-grpo-seed0"]
    for job in jobs:
        assert [r["step"] for r in read_metrics(sweep / job)] == [0, 1]
        assert f"name: {job.split('-')[1]}\n" in (sweep / job / ".hydra" / "config.yaml").read_text()

    png = tmp_path / "curves.png"
    out = subprocess.run([sys.executable, "-m", "sapo_ray.compare", str(sweep), "--out", str(png)], cwd=tmp_path,
                         env=child_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[3:] if not line.startswith("curves:")}
    assert set(rows) == {"sapo", "grpo"}
    assert all(r[1:4] == ["1", "0", "1"] for r in rows.values())  # one run each, seed 0, last step 1
    assert png.stat().st_size > 0


def test_two_nodes_pin_rollout_and_learners(cluster, random_tiny_models, tmp_path):
    """Head (node_a) + a second raylet (node_b): custom resources put the rollout worker on node_b and
    the policy/critic ranks on node_a; Ray's state API (dead actors included) says where each ran."""
    from ray.util.state import list_actors, list_nodes

    c = cluster(multi_node=True)
    c.start_head(num_cpus=1, resources={"node_a": 1})
    c.add_node(num_cpus=1, resources={"node_b": 1})
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "sapo_ray.main", *tiny_overrides(random_tiny_models["vlm"]),
                           "+rollout.resources={node_b: 0.1}", "+actor.resources={node_a: 0.1}",
                           "+critic.resources={node_a: 0.1}", f"hydra.run.dir={run_dir}"],
                          cwd=REPO, env={**c.env, "RAY_ADDRESS": c.gcs_address}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{tail(proc.stdout)}\n{tail(proc.stderr)}\n{c.logs()}"
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1]

    node_of = {}  # node id -> the custom resource naming it
    for n in list_nodes(address=c.dashboard_url, detail=True):
        (name,) = {"node_a", "node_b"} & set(n.resources_total)
        node_of[n.node_id] = name
    assert sorted(node_of.values()) == ["node_a", "node_b"]
    placed: dict[str, set[str]] = {}
    for a in list_actors(address=c.dashboard_url, detail=True):
        placed.setdefault(a.class_name, set()).add(node_of[a.node_id])
    assert placed == {"RolloutWorker": {"node_b"}, "PolicyWorker": {"node_a"}, "CriticWorker": {"node_a"}}


def test_two_nodes_colocated_on_simulated_gpus(cluster, random_tiny_models, tmp_path):
    """Two nodes of 2 logical GPUs each, `cluster.placement=colocate` over 4 GPUs (GRPO: engines and actor
    ranks): the placement group spans both nodes, and each node holds two engines and two actor ranks,
    one of each per GPU; the run trains a step with its ranks on both nodes."""
    from ray.util.state import list_actors, list_nodes

    c = cluster(multi_node=True)
    c.start_head(num_cpus=1, resources={"node_a": 1}, num_gpus=2)
    c.add_node(num_cpus=1, resources={"node_b": 1}, num_gpus=2)
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "sapo_ray.main", *tiny_overrides(random_tiny_models["vlm"]),
                           "algorithm=grpo", "cluster.placement=colocate", "cluster.simulate_gpus=4",
                           "rollout.num_workers=4", "rollout.num_gpus=0.5", "rollout.num_cpus=0.2",
                           "actor.world_size=4", "actor.num_gpus=0.5", "actor.num_cpus=0.2", f"hydra.run.dir={run_dir}"],
                          cwd=REPO, env={**c.env, "RAY_ADDRESS": c.gcs_address}, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, f"{tail(proc.stdout)}\n{tail(proc.stderr)}\n{c.logs()}"
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1]
    node_of = {n.node_id: ({"node_a", "node_b"} & set(n.resources_total)).pop()
               for n in list_nodes(address=c.dashboard_url, detail=True)}
    ranks: dict[str, list[str]] = {}
    for a in sorted(list_actors(address=c.dashboard_url, detail=True), key=lambda a: a.actor_id):
        if a.class_name in ("RolloutWorker", "PolicyWorker"):
            ranks.setdefault(a.class_name, []).append(node_of[a.node_id])
    assert sorted(ranks["PolicyWorker"]) == sorted(ranks["RolloutWorker"]) == ["node_a", "node_a", "node_b", "node_b"]
