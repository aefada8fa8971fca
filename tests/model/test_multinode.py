"""Multi-node meta-training for real: two torchrun launchers on this machine, one per "node"
(`--nnodes 2 --nproc-per-node 1`, a c10d rendezvous on 127.0.0.1, one rdzv id), train one
meta-learned init into one output_dir (one machine, so the shared storage multi-node runs need
is given).

What one machine changes, and how the launchers are pinned to what two machines would do:
  * `--node-rank` is passed as a real launch would, but the c10d rendezvous ignores it (torch
    warns so): global ranks are assigned by the rendezvous (sorted by host, then agent pid), so
    the "node 1" launcher's worker may be global rank 0. Nothing here depends on which it is.
  * Both launchers' host matches the endpoint, so whichever binds the port first would host
    the rendezvous store. `--rdzv-conf is_host=1/0` gives it to node 0, as hostnames would.
  * torchrun starts each worker in a session of its own: killing the launcher's process group
    leaves its worker training. A dead node loses both, so `_Node.kill` kills every group of
    the launcher's process tree.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from metaloop.config import load_params
from metaloop.launch import ERROR_FILE_ENV, torchrun_command, torchrun_env
from metaloop.train import run
from support import free_port


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l] if path.is_file() else []


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _latest_step(out: Path) -> int | None:
    try:
        return json.loads((out / "checkpoints" / "latest.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    pointer = json.loads((out / "checkpoints" / "latest.json").read_text())
    return load_file(out / "checkpoints" / pointer["dir"] / "weights.safetensors")


def _assert_same(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], atol=atol, rtol=0, msg=k)


# ---------------------------------------------------------------- processes


def _children() -> dict[int, list[tuple[int, int]]]:
    """ppid -> [(pid, pgid)] for every process now alive (from /proc)."""
    kids: dict[int, list[tuple[int, int]]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append((int(name), int(fields[2])))
    return kids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class _Node:
    """One torchrun launcher (its own session), its log in a file, the process groups it made."""

    def __init__(self, cmd: list[str], env: dict, log: Path):
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.groups = {self.proc.pid}

    def _scan(self) -> None:
        kids, todo = _children(), [self.proc.pid]
        while todo:
            for pid, pgid in kids.get(todo.pop(), []):
                self.groups.add(pgid)
                todo.append(pid)

    def poll(self) -> int | None:
        self._scan()  # remember the workers' groups while the launcher can still be asked for them
        return self.proc.poll()

    def wait(self, timeout: float) -> int:
        deadline = time.time() + timeout
        while self.poll() is None:
            if time.time() > deadline:
                raise AssertionError(f"launcher still running after {timeout:.0f} s\n{self.tail()}")
            time.sleep(0.2)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the launcher's group and its workers' groups: the node is gone."""
        if self.proc.poll() is None:
            self._scan()
        for pgid in sorted(self.groups):
            if pgid == self.proc.pid or "metaloop" in _cmdline(pgid):  # never a recycled pid's group
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def tail(self, n: int = 40) -> str:
        lines = [l for l in self.log.read_text(errors="replace").splitlines() if "it/s]" not in l]
        return f"--- {self.log.name} (last {n} lines)\n" + "\n".join(lines[-n:])


@pytest.fixture
def nodes():
    """nodes(cmd, env, log) -> a started _Node; every node is killed at the end, whatever happened."""
    started: list[_Node] = []

    def start(cmd, env, log):
        started.append(_Node(cmd, env, log))
        return started[-1]

    try:
        yield start
    finally:
        for node in started:
            node.kill()


def _two_node_project(make_project, root: Path, tiny_dir: Path, **meta) -> Path:
    port = free_port()
    return make_project(root, tiny_dir, nnodes="2", nproc=1, rdzv_endpoint=f"127.0.0.1:{port}",
                        rdzv_id=f"multinode-{root.name}-{port}", **meta)


def _node_command(params, path: Path, node_rank: int) -> list[str]:
    """torchrun_command plus what one launcher of a two-node job adds: its node rank, and (one
    machine) which launcher hosts the rendezvous store; a bounded join timeout so nothing
    waits torchrun's default 600 s."""
    cmd = torchrun_command(params, path)
    at = cmd.index("--nnodes")
    conf = f"is_host={1 if node_rank == 0 else 0},join_timeout=120"
    return [*cmd[:at], "--node-rank", str(node_rank), "--rdzv-conf", conf, *cmd[at:]]


def _env(params, sub_env) -> dict:
    return {**torchrun_env(params, base=sub_env), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


# ---------------------------------------------------------------- tests


def test_torchrun_env_unshares_the_agent_store_for_rendezvous_runs(project):
    multi = load_params(project("multi", nnodes="2", nproc=1, rdzv_endpoint="head:29400"))
    assert torchrun_env(multi, base={})["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    error_file = {ERROR_FILE_ENV: str(multi.meta.output_dir.resolve() / "launch-error.json")}
    assert torchrun_env(multi, base={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0"}) == {
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0", "OMP_NUM_THREADS": "1", **error_file}  # a caller's choice stands
    single = load_params(project("single"))
    assert torchrun_env(single, base={}) == {  # --standalone: torch's default store
        "OMP_NUM_THREADS": "1", ERROR_FILE_ENV: str(single.meta.output_dir.resolve() / "launch-error.json")}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_nodes_train_one_init(tmp_path, tiny_dir, make_project, sub_env, nodes):
    path = _two_node_project(make_project, tmp_path / "two", tiny_dir, steps=6, checkpoint_every=2, val_every=3)
    params = load_params(path)
    out, env = params.meta.output_dir, _env(params, sub_env)
    launchers = [nodes(_node_command(params, path, r), env, tmp_path / f"node{r}.log") for r in (0, 1)]
    codes = [n.wait(timeout=180) for n in launchers]
    logs = "\n".join(n.tail() for n in launchers)
    assert codes == [0, 0], logs

    summary = _summary(out)
    assert summary["world_size"] == 2 and summary["step"] == 6 and summary["resumed_from"] is None, logs
    assert summary["backend"] == "gloo" and summary["device"] == "cpu"
    digests = summary["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], digests  # one init, held by both nodes

    # rank 0 alone wrote: one checkpoint series, one metrics row per step, one export
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl", "model", "summary.json"]
    assert [p.relative_to(out).as_posix() for p in out.rglob("latest.json")] == ["checkpoints/latest.json"]
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == [f"best-{summary['best_step']:08d}", "latest.json", "step-00000004", "step-00000006"]
    assert _latest_step(out) == 6
    assert [r["step"] for r in _metrics(out)] == [0, 1, 2, 3, 4, 5, 6]
    assert (out / "model" / "model.safetensors").is_file() and not list(out.glob(".tmp-*"))
    assert json.loads((out / "model" / "metaloop_head.json").read_text())["step"] == summary["best_step"]

    # the two nodes split each meta-batch: the same init as one process taking all of it
    single = run(load_params(make_project(tmp_path / "single", tiny_dir, steps=6, checkpoint_every=2, val_every=3)))
    _assert_same(_final_weights(out), single.learner.state_dict(), atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_killed_node_rejoins_and_the_job_resumes(tmp_path, tiny_dir, make_project, sub_env, nodes):
    """Node 1 dies (launcher and worker, SIGKILL) after a checkpoint; its launcher is started
    again with the same command. Node 0's agent (--max-restarts 1) is never touched: its worker
    fails on the dead peer, the agent re-rendezvouses, the new node 1 joins, and the job resumes
    from the last checkpoint and finishes."""
    steps = 150
    path = _two_node_project(make_project, tmp_path / "elastic", tiny_dir, steps=steps, checkpoint_every=5,
                             val_every=50, max_restarts=1)
    params = load_params(path)
    out, env = params.meta.output_dir, _env(params, sub_env)
    node0 = nodes(_node_command(params, path, 0), env, tmp_path / "node0.log")
    node1 = nodes(_node_command(params, path, 1), env, tmp_path / "node1.log")

    deadline = time.time() + 150
    while (_latest_step(out) or 0) < 5:
        codes = node0.poll(), node1.poll()
        assert codes == (None, None), f"a launcher exited before the first checkpoint: {codes}\n" \
                                      f"{node0.tail()}\n{node1.tail()}"
        assert time.time() < deadline, f"no checkpoint after 150 s\n{node0.tail()}\n{node1.tail()}"
        time.sleep(0.05)
    node1.kill()
    at_kill = _latest_step(out)
    assert at_kill is not None and 5 <= at_kill < steps and not (out / "summary.json").exists()
    assert node0.poll() is None, f"node 0's launcher died with node 1\n{node0.tail()}"

    rejoined = nodes(_node_command(params, path, 1), env, tmp_path / "node1-again.log")
    codes = [node0.wait(timeout=240), rejoined.wait(timeout=60)]
    logs = "\n".join(n.tail() for n in (node0, node1, rejoined))
    assert codes == [0, 0], logs

    summary = _summary(out)
    assert summary["step"] == steps and not summary["interrupted"], logs
    assert summary["resumed_from"] is not None and summary["resumed_from"] >= at_kill, (summary, at_kill)
    assert summary["world_size"] == 2
    digests = summary["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], digests
    # the resumed run dropped what the lost attempt wrote after its checkpoint: each step once
    assert [r["step"] for r in _metrics(out)] == list(range(steps + 1))
    assert [p.relative_to(out).as_posix() for p in out.rglob("latest.json")] == ["checkpoints/latest.json"]
    assert _latest_step(out) == steps and (out / "model" / "model.safetensors").is_file()
