"""The same code against real services on 127.0.0.1, configured by environment variables only.

Started natively (no Docker engine here), stopped by pid at the end:

* Postgres (Debian's package: `initdb` + `postgres`), one database for MLflow, one for Prefect;
  when it is not installed, or psycopg2 is missing, both fall back to SQLite and say so (the
  Postgres test is then skipped, naming why); with METALOOP_REQUIRE_POSTGRES=1 (`.ci/run` sets
  it, after installing Debian's package where `initdb` is missing) the fallback is a failure;
* `moto_server` as the S3 store, reached through a small forwarding process: killing that
  process takes the S3 endpoint down and restarting it brings it back *with its data*, as
  after a real object-store outage (moto keeps everything in memory, so killing moto itself
  would also wipe the buckets);
* `mlflow server` with the Postgres backend, `--serve-artifacts --artifacts-destination s3://`
  and the allowed hosts that infra/docker-compose.yml sets;
* `prefect server start` on Postgres.

Then: registry behaviour against the server (register, promote, keep, roll back, load
`models:/...@champion` in a fresh process without S3 credentials, artifacts really in the
bucket); the retrain flow with the S3 endpoint killed while it runs (the artifact upload is
retried, the flow fails saying so, nothing is registered) and a rerun once S3 is back that
trains, registers and promotes, with the DVC data in S3, MLflow artifacts in S3 and both
flow runs recorded in the Prefect server.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from support import BIN, ROOT, commit_all, flow_project, free_port, params_edit, tiny_classifier

pytestmark = pytest.mark.slow
REQUIRE_POSTGRES = "METALOOP_REQUIRE_POSTGRES"  # set by .ci/run: no SQLite fallback

TARGET = "hospitality"
BUCKET = "metaloop"  # one bucket, two prefixes, as in infra/docker-compose.yml: mlflow/ and dvc/
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
QUIET = {
    "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
}

# A TCP forwarder: the S3 endpoint the services see. Killing it = S3 down; restarting it = S3 back.
FORWARDER = r"""
import asyncio, sys
listen, target = int(sys.argv[1]), int(sys.argv[2])
async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except Exception:
        pass
    finally:
        writer.close()
async def handle(reader, writer):
    try:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
    except OSError:
        writer.close()
        return
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", listen, reuse_address=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


def base_env(**extra: str) -> dict[str, str]:
    """This venv's PATH, no telemetry, one thread, and no AWS_/MLFLOW_/PREFECT_ settings leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **QUIET, **extra}


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log: Path
    stop_signal: int = signal.SIGTERM

    def tail(self, n: int = 40) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.is_file() else []
        return f"--- {self.name} log ({self.log}) ---\n" + "\n".join(lines[-n:])

    def stop(self) -> None:
        """Stop this service and the processes it started, by pid."""
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                p.send_signal(self.stop_signal)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)


def spawn(name: str, cmd: list[str], env: dict, logs: Path, **kw) -> Service:
    log = logs / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
    return Service(name, proc, log)


def wait_port(port: int, svc: Service, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if svc.proc.poll() is not None:
            raise RuntimeError(f"{svc.name} exited {svc.proc.returncode}\n{svc.tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{svc.name} did not listen on {port} within {timeout:.0f} s\n{svc.tail()}")


def wait_http(url: str, svc: Service, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if svc.proc.poll() is not None:
            raise RuntimeError(f"{svc.name} exited {svc.proc.returncode}\n{svc.tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{svc.name}: {url} not healthy within {timeout:.0f} s\n{svc.tail()}")


# ------------------------------------------------------------------ Postgres (optional)


def postgres_binaries() -> tuple[Path, Path] | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None)
    if not found:
        return None
    initdb = Path(found).resolve()
    return initdb, initdb.with_name("postgres")


def start_postgres(logs: Path) -> tuple[Service, int, Path] | str:
    """A throwaway cluster on 127.0.0.1 with databases `mlflow` and `prefect`, or why not."""
    if os.environ.get("METALOOP_TEST_SQLITE"):
        return "METALOOP_TEST_SQLITE is set"
    bins = postgres_binaries()
    if bins is None:
        return "no initdb found (apt-get install postgresql)"
    missing = [m for m in ("psycopg2", "asyncpg") if importlib.util.find_spec(m) is None]
    if missing:
        return f"python driver(s) {missing} not installed (pip install psycopg2-binary)"
    user = None
    if os.geteuid() == 0:  # postgres refuses to run as root: use Debian's `postgres` account
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user"
        user = "postgres"
    # Outside pytest's tmp (mode 700, root's) so the postgres account can enter it.
    base = Path(tempfile.mkdtemp(prefix="metaloop-pg-"))
    if user:
        account = pwd.getpwnam(user)
        os.chown(base, account.pw_uid, account.pw_gid)
    initdb, postgres = bins
    cmd = [str(initdb), "-D", str(base / "data"), "-A", "trust", "-U", "postgres", "-N", "--no-locale", "-E", "UTF8"]
    proc = subprocess.run(cmd, user=user, cwd=base, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        return f"initdb failed: {proc.stderr.strip()[-300:]}"
    port = free_port()
    svc = spawn("postgres", [str(postgres), "-D", str(base / "data"), "-k", str(base), "-h", "127.0.0.1",
                             "-p", str(port), "-F"], base_env(), logs, user=user, cwd=base)
    svc.stop_signal = signal.SIGINT  # "fast" shutdown: does not wait for clients to disconnect
    import psycopg2

    deadline = time.time() + 30
    while True:
        try:
            conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
            break
        except psycopg2.OperationalError:
            if time.time() > deadline or svc.proc.poll() is not None:
                svc.stop()
                shutil.rmtree(base, ignore_errors=True)
                return f"postgres did not start\n{svc.tail()}"
            time.sleep(0.2)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE DATABASE mlflow")
        cur.execute("CREATE DATABASE prefect")
    conn.close()
    return svc, port, base


# ------------------------------------------------------------------ the stack


def compose_allowed_hosts() -> str:
    """MLFLOW_SERVER_ALLOWED_HOSTS as infra/docker-compose.yml sets it (defaults from .env.example)."""
    compose = yaml.safe_load((ROOT / "infra" / "docker-compose.yml").read_text())
    value = str(compose["services"]["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"])
    defaults = dict(
        line.split("=", 1) for line in (ROOT / "infra" / ".env.example").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#") and "=" in line
    )
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: defaults.get(m.group(1)) or m.group(2) or "", value)


@dataclass
class Stack:
    root: Path
    backend: str  # "postgresql" or "sqlite (reason)"
    moto_url: str
    s3_url: str  # what clients use: the forwarder in front of moto
    mlflow_url: str
    prefect_api: str
    services: dict[str, Service] = field(default_factory=dict)
    s3_port: int = 0
    moto_port: int = 0
    pg_port: int | None = None  # the Postgres cluster behind MLflow and Prefect, if they run on one

    def s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.moto_url, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def s3_down(self) -> None:
        self.services.pop("s3").stop()

    def s3_up(self) -> None:
        svc = spawn("s3", [sys.executable, "-c", FORWARDER, str(self.s3_port), str(self.moto_port)], base_env(),
                    self.root / "logs")
        wait_port(self.s3_port, svc)
        self.services["s3"] = svc

    def prefect(self, path: str, body: dict | None = None) -> list | dict:
        r = httpx.post(f"{self.prefect_api}{path}", json=body or {}, timeout=30)
        r.raise_for_status()
        return r.json()

    def logs(self) -> str:
        return "\n".join(s.tail(25) for s in self.services.values())


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("services")
    logs = root / "logs"
    logs.mkdir()
    started = time.time()
    services: dict[str, Service] = {}
    pg_dir = None
    try:
        pg = start_postgres(logs)
        pg_port = None
        if isinstance(pg, str) and os.environ.get(REQUIRE_POSTGRES):
            pytest.fail(f"{REQUIRE_POSTGRES}=1 but Postgres cannot run here: {pg}", pytrace=False)
        if isinstance(pg, str):
            backend = f"sqlite ({pg})"
            mlflow_db = f"sqlite:///{root / 'mlflow.db'}"
            prefect_db = f"sqlite+aiosqlite:///{root / 'prefect.db'}"
        else:
            services["postgres"], pg_port, pg_dir = pg
            backend = "postgresql"
            mlflow_db = f"postgresql+psycopg2://postgres@127.0.0.1:{pg_port}/mlflow"
            prefect_db = f"postgresql+asyncpg://postgres@127.0.0.1:{pg_port}/prefect"

        moto_port, s3_port, mlflow_port, prefect_port = (free_port() for _ in range(4))
        services["moto"] = spawn("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(moto_port)],
                                 base_env(), logs)
        s = Stack(root, backend, f"http://127.0.0.1:{moto_port}", f"http://127.0.0.1:{s3_port}",
                  f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api", services,
                  s3_port=s3_port, moto_port=moto_port, pg_port=pg_port)
        s.s3_up()
        wait_port(moto_port, services["moto"])
        s.s3().create_bucket(Bucket=BUCKET)

        # Started as the metaloop-mlflow image starts it (infra/mlflow/serve.sh), configured as
        # infra/docker-compose.yml configures it: backend and allowed hosts from the environment.
        services["mlflow"] = spawn("mlflow", [
            str(ROOT / "infra" / "mlflow" / "serve.sh"),
            "--serve-artifacts", "--artifacts-destination", f"s3://{BUCKET}/mlflow",
            "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
        ], base_env(**CREDS, MLFLOW_BACKEND_STORE_URI=mlflow_db, MLFLOW_S3_ENDPOINT_URL=s.s3_url,
                    MLFLOW_SERVER_ALLOWED_HOSTS=f"{compose_allowed_hosts()},127.0.0.1:{mlflow_port}",
                    MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_BASIC_AUTH="false",
                    AWS_MAX_ATTEMPTS="2"), logs, cwd=root)
        services["prefect"] = spawn("prefect", [
            str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port), "--no-ui",
        ], base_env(PREFECT_HOME=str(root / "prefect-server"), PREFECT_API_DATABASE_CONNECTION_URL=prefect_db,
                    PREFECT_SERVER_ANALYTICS_ENABLED="false"), logs, cwd=root)
        wait_http(f"{s.mlflow_url}/health", services["mlflow"])
        wait_http(f"{s.prefect_api}/health", services["prefect"])
        print(f"\nservices up in {time.time() - started:.0f} s; MLflow/Prefect backend: {backend}")
        yield s
    finally:
        for name in ("prefect", "mlflow", "s3", "moto", "postgres"):
            if name in services:
                services.pop(name).stop()
        if pg_dir:
            shutil.rmtree(pg_dir, ignore_errors=True)


@pytest.fixture
def mlflow_env(stack, monkeypatch):
    """This process talks to the server only; it has no S3 credentials at all."""
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow_url)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return stack


def load_and_predict(stack: Stack, model_uri: str, texts: list[str], cwd: Path) -> list[dict]:
    """Load a registered model in a fresh process that knows the tracking server and nothing else."""
    code = (
        "import json, sys, mlflow.pyfunc;"
        f"m = mlflow.pyfunc.load_model({model_uri!r});"
        f"print(json.dumps(m.predict({texts!r}).to_dict('records')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env=base_env(MLFLOW_TRACKING_URI=stack.mlflow_url), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:] + stack.logs()
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ (0) the compose file's allowed hosts


def test_mlflow_accepts_the_compose_service_name_and_rejects_other_hosts(stack):
    api = f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search"
    ok = httpx.post(api, json={"max_results": 1}, headers={"Host": "mlflow:5000"})
    assert ok.status_code == 200, ok.text
    bad = httpx.post(api, json={"max_results": 1}, headers={"Host": "attacker.example:5000"})
    assert bad.status_code in (400, 403), bad.text


# ------------------------------------------------------------------ (0b) the backend they run on


def test_mlflow_and_prefect_store_their_data_in_postgres(stack):
    """What each server writes lands in its Postgres database, read back with psycopg2."""
    if stack.pg_port is None:
        assert not os.environ.get(REQUIRE_POSTGRES)  # the fixture already failed in that case
        pytest.skip(f"MLflow and Prefect ran on {stack.backend}; set {REQUIRE_POSTGRES}=1 (as .ci/run does) "
                    "to make that a failure")
    import uuid

    import psycopg2

    assert stack.backend == "postgresql"
    marker = f"pg-check-{uuid.uuid4().hex[:8]}"
    r = httpx.post(f"{stack.mlflow_url}/api/2.0/mlflow/experiments/create", json={"name": marker}, timeout=30)
    assert r.status_code == 200, r.text
    stack.prefect("/flows/", {"name": marker})

    def rows(db: str, sql: str) -> list[tuple]:
        conn = psycopg2.connect(host="127.0.0.1", port=stack.pg_port, user="postgres", dbname=db)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, (marker,))
                return cur.fetchall()
        finally:
            conn.close()

    assert rows("mlflow", "SELECT name FROM experiments WHERE name = %s") == [(marker,)]
    assert rows("prefect", "SELECT name FROM flow WHERE name = %s") == [(marker,)]


# ------------------------------------------------------------------ (1) registry behaviour


def test_registry_against_the_server_with_artifacts_in_s3(mlflow_env, tmp_path):
    from mlflow import MlflowClient

    from metaloop.config import Promotion
    from tasks.registry import (
        CHALLENGER,
        CHAMPION,
        _alias,
        log_classifier,
        promote,
        register_version,
        rollback,
    )
    from tasks.tracking import TAG, client, experiment_id, start_run

    stack, name, labels = mlflow_env, "metaloop-hotel", ["checkout", "shuttle", "towels"]
    policy = Promotion(margin=0.5, guarded={"accuracy_1shot": 1.0}, alpha=None).policy()
    c = client()
    assert isinstance(c, MlflowClient) and c.tracking_uri == stack.mlflow_url
    exp = experiment_id(c, "registry-on-server")

    def new_version(accuracy: float, seed: int) -> tuple[str, str]:
        run = start_run(c, exp, "domain-hotel")
        source = log_classifier(c, run, tiny_classifier(tmp_path / f"clf-{seed}", labels, seed=seed))
        tags = {TAG + "eval_hash": "e1", TAG + "metrics": json.dumps({"accuracy": accuracy, "accuracy_1shot": 80.0}),
                TAG + "data_hash": "d1", TAG + "git_commit": "abc", TAG + "params_hash": "p1", TAG + "recipe": "fp32",
                TAG + "parent_run_id": run}
        return register_version(c, name, source, run, tags), run

    v1, run1 = new_version(90.0, 1)
    assert promote(c, name, v1, policy).reasons == ("no champion yet",)
    v2, _ = new_version(90.2, 2)  # within the margin: stays challenger
    assert not promote(c, name, v2, policy).promote
    assert _alias(c, name, CHAMPION) == v1 and _alias(c, name, CHALLENGER) == v2
    v3, run3 = new_version(93.0, 3)
    assert promote(c, name, v3, policy).promote and _alias(c, name, CHAMPION) == v3
    assert c.get_model_version(name, v3).tags[TAG + "previous_champion"] == v1
    assert rollback(c, name) == v1 and _alias(c, name, CHAMPION) == v1
    assert promote(c, name, v3, policy).promote is True  # replays the recorded decision: v3 back on top
    assert _alias(c, name, CHAMPION) == v3

    # The artifacts went through the server (proxied URI) into the S3 bucket.
    assert c.get_run(run3).info.artifact_uri.startswith("mlflow-artifacts:")
    keys = stack.keys(BUCKET, "mlflow/")
    for run in (run1, run3):
        mine = [k for k in keys if f"/{run}/" in k]
        assert any(k.endswith("/model/MLmodel") for k in mine), mine
        assert any(k.endswith("model.safetensors") for k in mine), mine
        assert not any(k.endswith((".pkl", ".pt", ".bin")) for k in mine), mine

    preds = load_and_predict(stack, f"models:/{name}@champion", ["can the shuttle pick us up at 6am", "more towels"],
                             tmp_path)
    assert len(preds) == 2 and all(p["label"] in labels and 0 < p["score"] <= 1 for p in preds)


# ------------------------------------------------------------------ (2)+(3) the retrain flow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A throwaway checkout with no DVC remote configured: the environment supplies it."""
    root = flow_project(tmp_path_factory.mktemp("realflow") / "proj", env=base_env())
    params_edit(
        root,
        sources=[{"kind": "packaged", "per_label": 12, "domains": [
            "hr_requests", "it_helpdesk", "education", "fitness_gym", TARGET]}],
        domains={"meta_train": ["hr_requests", "it_helpdesk", "education"], "meta_val": ["fitness_gym"],
                 "target": [TARGET]},
        episodes={"ways": 3, "shots": 2, "queries": 2, "meta_train_episodes": 20, "meta_val_episodes": 4,
                  "eval_shots": [1, 2], "eval_draws": 2},
        backbone={"name_or_path": "tiny", "pooling": "mean", "max_length": 32},
        meta={"algorithm": "protonet", "steps": 4, "checkpoint_every": 2, "val_every": 2, "val_episodes": 2,
              "nproc": 1, "meta_batch_size": 2},
        adapt={"epochs": 1},
        compress={"recipes": {}},
        registry={"recipe": "fp32"},
    )
    commit_all(root)
    return root


def flow_env(stack: Stack, project: Path) -> dict:
    """Everything the flow needs to reach the team's services, as environment variables."""
    return base_env(
        **CREDS,
        MLFLOW_TRACKING_URI=stack.mlflow_url,
        PREFECT_API_URL=stack.prefect_api,
        PREFECT_HOME=str(project.parent / "prefect-client"),
        METALOOP_DVC_REMOTE_URL=f"s3://{BUCKET}/dvc",
        AWS_ENDPOINT_URL=stack.s3_url,
        # Fail fast in the test; the defaults (7 MLflow retries with backoff, 5 S3 attempts) ride out minutes.
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1", AWS_MAX_ATTEMPTS="2",
    )


def start_flow(stack: Stack, project: Path) -> subprocess.Popen:
    # infra/entrypoint.sh is the worker image's entry point: it maps the environment onto DVC.
    return subprocess.Popen([str(ROOT / "infra" / "entrypoint.sh"), "metaloop", "run"], cwd=project,
                            env=flow_env(stack, project), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def task_runs(stack: Stack, flow_run_id: str | None = None, name: str | None = None) -> list[dict]:
    body: dict = {"sort": "EXPECTED_START_TIME_DESC", "limit": 200}
    if flow_run_id:
        body["flow_runs"] = {"id": {"any_": [flow_run_id]}}
    if name:
        body["task_runs"] = {"name": {"like_": name}}
    return stack.prefect("/task_runs/filter", body)


def retrain_runs(stack: Stack) -> list[dict]:
    return stack.prefect("/flow_runs/filter", {"flows": {"name": {"any_": ["metaloop-retrain"]}},
                                               "sort": "EXPECTED_START_TIME_ASC"})


def registry_snapshot(c, names: list[str]) -> dict:
    out = {}
    for rm in c.search_registered_models():
        if rm.name in names:
            out[rm.name] = sorted(v.version for v in c.search_model_versions(f"name = '{rm.name}'"))
    return out


def wait_for_trainer(project: Path, flow: subprocess.Popen, timeout: float = 300) -> psutil.Process | None:
    """The flow's meta-training worker (`python -m metaloop.train`, started by torchrun in
    `project`), stopped (SIGSTOP) as soon as it exists: it cannot finish until resumed. Its
    start (imports, data) takes seconds, the scan a few milliseconds. None if the flow ended first."""
    deadline = time.time() + timeout
    while flow.poll() is None and time.time() < deadline:
        for p in psutil.process_iter(["cmdline", "cwd"]):
            cmd = p.info["cmdline"] or []
            if p.info["cwd"] == str(project) and "metaloop.train" in cmd and "torch.distributed.run" not in cmd:
                try:
                    p.suspend()
                    while p.status() != psutil.STATUS_STOPPED:  # the kernel's state, not a delay
                        time.sleep(0.01)
                except psutil.NoSuchProcess:  # it ended before it could be stopped: meta-training is over
                    raise AssertionError("meta-training finished before the test could hold it") from None
                return p
        time.sleep(0.05)
    return None


def test_s3_outage_mid_flow_fails_cleanly_then_a_rerun_completes(stack, project, mlflow_env):
    """(3) S3 dies while meta-training runs: the uploads that follow are retried, the flow fails
    saying what failed, nothing is registered; with S3 back, a plain rerun trains and promotes."""
    from tasks.tracking import client

    c = client()
    names = ["metaloop-meta", f"metaloop-{TARGET}"]
    assert registry_snapshot(c, names) == {}
    started = time.time()
    proc = start_flow(stack, project)
    killed_at, trainer, out = None, None, ""
    try:
        # No clock: the trainer (torchrun's worker) is held stopped while S3 goes down, so
        # meta-training is running, and cannot have finished, when the endpoint dies.
        trainer = wait_for_trainer(project, proc)
        if trainer is None:
            ended = proc.poll() is not None
            pytest.fail("meta-training never started" + (":\n" + proc.communicate()[0][-3000:] if ended else ""))
        assert not (project / "artifacts" / "meta" / "summary.json").exists(), "meta-training finished already"
        stack.s3_down()
        killed_at = time.time() - started
        trainer.resume()
        out, _ = proc.communicate(timeout=400)
    finally:
        if trainer is not None:
            try:
                trainer.resume()
            except psutil.NoSuchProcess:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if "s3" not in stack.services:
            stack.s3_up()  # the endpoint comes back, with the data it had
    print(f"\nS3 killed {killed_at:.0f} s into the run; the run failed after {time.time() - started:.0f} s")

    # The flow failed, and says which step and why.
    assert proc.returncode != 0, out[-3000:]
    assert "register-meta" in out and ("mlflow-artifacts" in out or "artifact" in out.lower()), out[-3000:]
    runs = retrain_runs(stack)
    assert len(runs) == 1 and runs[0]["state_type"] == "FAILED"
    assert runs[0]["state"]["message"], runs[0]["state"]
    print("failed run's message in Prefect:", runs[0]["state"]["message"][:600])
    print("metaloop run's last lines:\n" + "\n".join(out.strip().splitlines()[-8:]))
    # ...after its artifact upload task was retried (1 try + 2 retries).
    upload = task_runs(stack, runs[0]["id"], "register-meta")
    assert upload and upload[0]["state_type"] == "FAILED" and upload[0]["run_count"] == 3, upload
    # The data push before the outage went through: DVC's objects are in the bucket.
    assert stack.keys(BUCKET, "dvc/files/md5/")
    # Nothing half-registered: no model, no version, no alias.
    assert registry_snapshot(c, names) == {}

    # S3 is back: the same command, unchanged, completes.
    started = time.time()
    proc = start_flow(stack, project)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:] + stack.logs()
    assert "retrain: trained" in out
    print(f"rerun completed in {time.time() - started:.0f} s")
    assert registry_snapshot(c, names) == {"metaloop-meta": ["1"], f"metaloop-{TARGET}": ["1"]}


def test_rerun_left_data_in_s3_models_in_s3_and_runs_in_prefect(stack, project, mlflow_env, tmp_path):
    """(2) What the completed run left behind, checked in each service."""
    from tasks.registry import CHAMPION, _alias
    from tasks.tracking import TAG, client

    c = client()
    name = f"metaloop-{TARGET}"
    assert _alias(c, name, CHAMPION) == "1" and _alias(c, "metaloop-meta", CHAMPION) == "1"
    version = c.get_model_version(name, "1")

    # DVC: every output dvc.lock pins is in the S3 remote, which lives only in the git-ignored config.local.
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    md5s = [o["md5"] for s in lock["stages"].values() for o in s["outs"]]
    dvc_keys = set(stack.keys(BUCKET, "dvc/files/md5/"))
    for md5 in md5s:
        assert f"dvc/files/md5/{md5[:2]}/{md5[2:]}" in dvc_keys, md5
    assert "s3://" not in (project / ".dvc" / "config").read_text()
    assert f"s3://{BUCKET}/dvc" in (project / ".dvc" / "config.local").read_text()
    status = subprocess.run([str(BIN / "dvc"), "status", "-c"], cwd=project, capture_output=True, text=True,
                            env=flow_env(stack, project), check=False)
    assert status.returncode == 0 and "in sync" in status.stdout, status.stdout + status.stderr

    # MLflow: lineage on the version, the run's dataset pointing at the DVC object in S3, artifacts in S3.
    assert version.tags[TAG + "data_hash"] and version.tags[TAG + "eval_hash"]
    parent = c.get_run(version.tags[TAG + "parent_run_id"])
    assert parent.info.status == "FINISHED"
    sources = [json.loads(d.dataset.source)["uri"] for d in parent.inputs.dataset_inputs]
    assert any(s.startswith(f"s3://{BUCKET}/dvc/files/md5/") for s in sources), sources
    ml_keys = stack.keys(BUCKET, "mlflow/")
    assert any(f"/{version.run_id}/" in k and k.endswith("model.safetensors") for k in ml_keys)
    assert any(f"/{parent.info.run_id}/" in k and k.endswith("report.md") for k in ml_keys)

    # The champion loads in a fresh process that has only MLFLOW_TRACKING_URI.
    preds = load_and_predict(stack, f"models:/{name}@champion", ["can I keep the room until 2pm?"], tmp_path)
    assert preds[0]["label"] and 0 < preds[0]["score"] <= 1

    # Prefect: both runs recorded by the server, the rerun completed with every step.
    runs = retrain_runs(stack)
    assert [r["state_type"] for r in runs] == ["FAILED", "COMPLETED"]
    done = {t["name"].rsplit("-", 1)[0] if not t["name"].startswith("adapt-") else t["name"]: t["state_type"]
            for t in task_runs(stack, runs[1]["id"])}
    for step in ("curate-and-build-episodes", "plan-what-is-stale", "dvc-push", "open-mlflow-runs", "meta-train",
                 "register-meta", f"adapt-{TARGET}", "register-and-promote", "publish-report"):
        assert done.get(step) == "COMPLETED", (step, done)
    artifacts = stack.prefect("/artifacts/filter", {"artifacts": {"key": {"any_": ["retrain-report"]}}})
    assert artifacts and "metaloop retrain: trained" in artifacts[-1]["data"]
