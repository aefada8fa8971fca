"""The production stack's files, checked for structure and wiring (no Docker engine needed).

infra/docker-compose.yml: every service pinned to a tag (never `latest`), health-checked, and
started only after what it needs is healthy; every address and credential a service reads
points at the service and port that serves it; every variable is in infra/.env.example and
that file holds no secret. Also the image (infra/Dockerfile), its entry point (run for real on
a throwaway DVC repo), MLflow's basic-auth wrapper, and the Kubernetes manifests.
tests/integration/test_real_services.py then runs the same settings against real servers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from support import BIN, ROOT

INFRA = ROOT / "infra"
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.auth.yml", "docker-compose.gpu.yml"]
VAR = re.compile(r"\$\{(\w+)(?:(:?[-?+])([^}]*))?\}")  # ${NAME}, ${NAME:-default}, ${NAME:?error}, ...


def env_example() -> dict[str, str]:
    out = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?err} against .env.example; `$$` stays a literal $."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        got = env.get(name, "")
        if op in (":-", "-"):
            return got or arg
        if op in (":+", "+"):
            return arg if got else ""
        return got

    return VAR.sub(sub, value.replace("$$", "\0")).replace("\0", "$")


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def compose(raw) -> dict:
    return interpolate(raw, env_example())


def as_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


# ------------------------------------------------------------------ services, images, health


def test_the_stack_has_every_service(compose):
    assert set(compose["services"]) >= {"postgres", "s3", "s3-init", "mlflow", "prefect-server", "prefect-worker"}


def test_every_image_is_pinned_to_a_release_tag(compose):
    for name, svc in compose["services"].items():
        image = svc.get("image")
        assert image, f"{name}: no image (built services must still name and tag their image)"
        ref = image.split("@")[0]
        _repo, _, tag = ref.rpartition(":") if ":" in ref.split("/")[-1] else (ref, "", "")
        assert tag and tag != "latest", f"{name}: {image} is not pinned to a tag"
        if "build" not in svc:
            assert re.search(r"\d+\.\d+|RELEASE\.\d{4}-", tag), f"{name}: {image}: pin a release, not a moving tag"
    # Docker Hub's minio/minio is gone: the object store comes from quay.io (or is RustFS).
    s3 = compose["services"]["s3"]["image"]
    assert s3.startswith(("quay.io/minio/minio:RELEASE.", "rustfs/rustfs:")), s3


def test_every_service_has_a_health_check(compose):
    for name, svc in compose["services"].items():
        check = svc.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name}: no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name


def test_dependencies_wait_for_health_or_completion(compose):
    services = compose["services"]
    one_shot = {n for n, s in services.items() if s.get("restart") == "no"}
    assert "s3-init" in one_shot
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on must use the long form with conditions"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            want = "service_completed_successfully" if dep in one_shot else "service_healthy"
            assert spec.get("condition") == want, f"{name} -> {dep}: condition should be {want}"
    # Nothing starts against a database, a bucket or an API that is not there yet.
    need = {"mlflow": {"postgres", "s3-init"}, "prefect-server": {"postgres"},
            "prefect-worker": {"prefect-server", "mlflow", "s3-init"}, "s3-init": {"s3"}}
    for name, deps in need.items():
        assert deps <= set(services[name]["depends_on"]), name


def test_published_ports_stay_on_localhost(compose):
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} would listen on every interface"


# ------------------------------------------------------------------ wiring


def test_mlflow_server_postgres_backend_and_proxied_s3_artifacts(compose):
    svc = compose["services"]["mlflow"]
    cmd, env = [str(c) for c in svc["command"]], as_env(svc)
    assert "--serve-artifacts" in cmd
    dest = urlparse(flag(cmd, "--artifacts-destination"))
    assert dest.scheme == "s3" and dest.netloc == compose["services"]["s3-init"]["environment"]["S3_BUCKET"]
    backend = urlparse(env["MLFLOW_BACKEND_STORE_URI"])
    assert backend.scheme.startswith("postgresql") and backend.hostname == "postgres" and backend.path == "/mlflow"
    assert "psycopg2" in backend.scheme  # the driver the mlflow image installs
    assert compose["services"]["postgres"]["environment"]["POSTGRES_DB"] == "mlflow"
    # The server reaches the object store by its service name and port, with the store's own keys.
    assert env["MLFLOW_S3_ENDPOINT_URL"] == s3_endpoint(compose)
    s3_env = compose["services"]["s3"]["environment"]
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (s3_env["MINIO_ROOT_USER"], s3_env["MINIO_ROOT_PASSWORD"])
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_mlflow_allowed_hosts_accept_the_service_name(compose):
    """MLflow >= 3.5 answers 403 to unknown Host headers; check with MLflow's own matcher."""
    from mlflow.server.security_utils import is_allowed_host_header

    allowed = [h.strip() for h in as_env(compose["services"]["mlflow"])["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")]
    port = flag([str(c) for c in compose["services"]["mlflow"]["command"]], "--port")
    worker_uri = urlparse(as_env(compose["services"]["prefect-worker"])["MLFLOW_TRACKING_URI"])
    published = compose["services"]["mlflow"]["ports"][0].split(":")[1]
    for host in (worker_uri.netloc, f"mlflow:{port}", f"localhost:{published}", f"127.0.0.1:{published}"):
        assert is_allowed_host_header(allowed, host), host
    assert "*" not in allowed and not is_allowed_host_header(allowed, "attacker.example:5000")


def test_prefect_server_on_postgres(compose):
    env = as_env(compose["services"]["prefect-server"])
    url = urlparse(env["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert url.scheme == "postgresql+asyncpg" and url.hostname == "postgres" and url.path == "/prefect"
    extra = compose["services"]["postgres"]["environment"]["METALOOP_EXTRA_DATABASES"].split()
    assert "prefect" in extra and "mlflow_auth" in extra
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert "PREFECT_SERVER_API_AUTH_STRING" not in env  # even empty, it would switch auth on


def s3_endpoint(compose) -> str:
    cmd = compose["services"]["s3"]["command"]
    return f"http://s3:{flag(cmd, '--address').lstrip(':')}"


def test_worker_env_is_what_the_project_reads(compose):
    worker = compose["services"]["prefect-worker"]
    env = as_env(worker)
    mlflow_port = flag([str(c) for c in compose["services"]["mlflow"]["command"]], "--port")
    prefect_port = flag(compose["services"]["prefect-server"]["command"], "--port")
    assert env["MLFLOW_TRACKING_URI"] == f"http://mlflow:{mlflow_port}"  # tasks/tracking.py
    assert env["PREFECT_API_URL"] == f"http://prefect-server:{prefect_port}/api"
    assert env["AWS_ENDPOINT_URL"] == s3_endpoint(compose)  # DVC's S3 remote and s3:// sources
    s3_env = compose["services"]["s3"]["environment"]
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (s3_env["MINIO_ROOT_USER"], s3_env["MINIO_ROOT_PASSWORD"])
    bucket = compose["services"]["s3-init"]["environment"]["S3_BUCKET"]
    assert env["METALOOP_DVC_REMOTE_URL"] == f"s3://{bucket}/dvc"  # infra/entrypoint.sh
    for key in ("MLFLOW_DISABLE_TELEMETRY", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK", "HF_HUB_OFFLINE"):
        assert key in env, key
    # Every MLFLOW_/AWS_/PREFECT_/METALOOP_ variable the code or the entry point reads is set,
    # or is optional on purpose.
    optional = {"MLFLOW_REGISTRY_URI": "defaults to the tracking URI", "METALOOP_DVC_REMOTE_NAME": "defaults to storage",
                "METALOOP_GIT_COMMIT": "baked into the image (Dockerfile ENV)"}
    read = set()
    for f in [*ROOT.joinpath("metaloop").rglob("*.py"), *ROOT.joinpath("tasks").rglob("*.py"),
              *ROOT.joinpath("flows").rglob("*.py")]:
        read |= set(re.findall(r"environ(?:\.get\(|\[)\s*[\"']((?:MLFLOW|AWS|PREFECT|METALOOP)_\w+)", f.read_text()))
    read |= set(re.findall(r"\$\{((?:MLFLOW|AWS|PREFECT|METALOOP)_\w+)", (INFRA / "entrypoint.sh").read_text()))
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "METALOOP_DVC_REMOTE_URL"} <= read
    missing = {v for v in read if v not in env and v not in optional}
    assert not missing, f"read by the code but not set on the worker: {sorted(missing)}"
    # The worker runs flows in the image's project folder, where prefect.yaml's pull step points.
    pull = yaml.safe_load((ROOT / "prefect.yaml").read_text())["pull"][0]
    assert next(iter(pull.values()))["directory"] == "/opt/metaloop"
    assert "/opt/metaloop/artifacts" in " ".join(worker.get("volumes", []))


def test_worker_polls_the_pool_prefect_yaml_deploys_to(compose):
    cmd = compose["services"]["prefect-worker"]["command"]
    assert cmd[:3] == ["prefect", "worker", "start"] and "--with-healthcheck" in cmd
    assert flag(cmd, "--type") == "process"
    pools = {d["work_pool"]["name"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert pools == {flag(cmd, "--pool")}
    health = " ".join(compose["services"]["prefect-worker"]["healthcheck"]["test"])
    assert compose["services"]["prefect-worker"]["environment"]["PREFECT_WORKER_WEBSERVER_PORT"] in health
    assert compose["services"]["deploy"]["command"][-2:] == ["deploy", "--all"]


def test_clients_and_servers_run_the_same_versions(compose):
    """Server images match the client libraries the project pins (API drift shows up late)."""
    import mlflow
    import prefect

    assert compose["services"]["prefect-server"]["image"].split(":")[1].startswith(prefect.__version__ + "-")
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert re.search(rf"ARG MLFLOW_VERSION={re.escape(mlflow.__version__)}\b", dockerfile), \
        f"infra/Dockerfile's MLFLOW_VERSION should be the client's {mlflow.__version__}"


# ------------------------------------------------------------------ variables and secrets


def test_every_variable_is_in_env_example_and_none_is_a_secret():
    example = env_example()
    used = set()
    for name in COMPOSE_FILES:
        text = (INFRA / name).read_text().replace("$$", "")
        used |= {m.group(1) for m in VAR.finditer(text)}
    assert used <= set(example), f"missing from infra/.env.example: {sorted(used - set(example))}"
    assert set(example) <= used, f"in .env.example but unused: {sorted(set(example) - used)}"
    for key, value in example.items():
        if re.search(r"PASSWORD|SECRET|KEY$|AUTH_STRING", key) and key != "S3_ACCESS_KEY_ID":
            assert value == "" or "change-me" in value, f"{key} looks like a real secret"
    # The filled-in copy never reaches git.
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=ROOT, check=False)
    assert ignored.returncode == 0, "infra/.env is not git-ignored"


def test_override_files_only_touch_known_services(raw):
    for name in COMPOSE_FILES[1:]:
        override = yaml.safe_load((INFRA / name).read_text())
        assert set(override["services"]) <= set(raw["services"]), name
    auth = yaml.safe_load((INFRA / "docker-compose.auth.yml").read_text())["services"]
    assert auth["mlflow"]["environment"]["MLFLOW_BASIC_AUTH"] == "true"
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(auth["prefect-worker"]["environment"])
    gpu = yaml.safe_load((INFRA / "docker-compose.gpu.yml").read_text())["services"]["prefect-worker"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


# ------------------------------------------------------------------ the image


def test_dockerfile_installs_torch_first_then_the_project_with_constraints():
    text = (INFRA / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\w+))?", text, re.MULTILINE)
    assert {s[1] for s in stages} >= {"base", "mlflow", "worker"}
    base = re.search(r"ARG PYTHON_IMAGE=(\S+)", text).group(1)
    assert re.search(r":\d+\.\d+\.\d+-", base), base
    assert re.search(r"ARG TORCH_VARIANT=cpu", text)
    pin = re.search(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(), re.MULTILINE).group(1)
    assert f"ARG TORCH_VERSION={pin}" in text
    torch_at = text.index('"torch==${TORCH_VERSION}"')
    assert "whl/${TORCH_VARIANT}" in text[text.rfind("\n", 0, torch_at - 200):torch_at]
    project_at = text.index("pip install -c constraints.txt .")
    assert torch_at < project_at
    assert 'ENTRYPOINT ["/usr/local/bin/metaloop-entrypoint"]' in text
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", ".dvc/config.local", "infra/.env"} <= set(ignore)


def dvc_repo(tmp_path: Path, with_git: bool) -> Path:
    repo = tmp_path / ("git" if with_git else "plain")
    repo.mkdir()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    if with_git:
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q", *([] if with_git else ["--no-scm"])], cwd=repo, check=True, env=env)
    if not with_git:  # as in the image: project config without no_scm, no .git
        (repo / ".dvc" / "config").write_text("")
    return repo


def run_entrypoint(repo: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "METALOOP_"))}
    full.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DO_NOT_TRACK="1", **env)
    return subprocess.run([str(INFRA / "entrypoint.sh"), "sh", "-c", "echo ran: $0", "ok"], cwd=repo,
                          capture_output=True, text=True, env=full, timeout=120, check=False)


def test_entrypoint_turns_the_environment_into_dvc_local_config(tmp_path):
    repo = dvc_repo(tmp_path, with_git=True)
    project_config = (repo / ".dvc" / "config").read_text()
    proc = run_entrypoint(repo, METALOOP_DVC_REMOTE_URL="s3://metaloop/dvc", AWS_ENDPOINT_URL="http://s3:9000",
                          AWS_ACCESS_KEY_ID="AKIAEXAMPLE", AWS_SECRET_ACCESS_KEY="not-written-anywhere")
    assert proc.returncode == 0 and "ran: ok" in proc.stdout, proc.stderr
    local = (repo / ".dvc" / "config.local").read_text()
    assert "s3://metaloop/dvc" in local and "http://s3:9000" in local and "remote = storage" in local
    assert "not-written-anywhere" not in local and "AKIAEXAMPLE" not in local
    assert (repo / ".dvc" / "config").read_text() == project_config  # the tracked file is untouched
    assert "/config.local" in (repo / ".dvc" / ".gitignore").read_text()
    # Again (a restarted container): same result, no error.
    assert run_entrypoint(repo, METALOOP_DVC_REMOTE_URL="s3://metaloop/dvc").returncode == 0


def test_entrypoint_without_git_sets_no_scm_and_leaves_remotes_alone(tmp_path):
    repo = dvc_repo(tmp_path, with_git=False)
    proc = run_entrypoint(repo)
    assert proc.returncode == 0, proc.stderr
    local = (repo / ".dvc" / "config.local").read_text()
    assert "no_scm = true" in local and "remote" not in local


def fake_mlflow(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mlflow").write_text('#!/bin/sh\necho "args: $*"\n[ -n "${MLFLOW_AUTH_CONFIG_PATH:-}" ] && cat "$MLFLOW_AUTH_CONFIG_PATH"\nexit 0\n')
    (bin_dir / "mlflow").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp_path)}


def test_mlflow_serve_wrapper_basic_auth_is_opt_in(tmp_path):
    serve = str(INFRA / "mlflow" / "serve.sh")
    env = fake_mlflow(tmp_path)
    plain = subprocess.run([serve, "--port", "5000"], capture_output=True, text=True, env=env, check=False)
    assert plain.stdout.strip() == "args: server --port 5000"
    auth_env = {**env, "MLFLOW_BASIC_AUTH": "true", "MLFLOW_AUTH_DATABASE_URI": "postgresql+psycopg2://u:p@postgres/mlflow_auth",
                "MLFLOW_AUTH_ADMIN_PASSWORD": "s3cret-admin", "MLFLOW_FLASK_SERVER_SECRET_KEY": "k"}
    auth = subprocess.run([serve, "--port", "5000"], capture_output=True, text=True, env=auth_env, check=False)
    assert auth.returncode == 0, auth.stderr
    assert "args: server --port 5000 --app-name basic-auth" in auth.stdout
    assert "database_uri = postgresql+psycopg2://u:p@postgres/mlflow_auth" in auth.stdout
    assert "s3cret-admin" not in auth.stdout  # MLflow reads the admin password from the environment
    incomplete = subprocess.run([serve], capture_output=True, text=True,
                                env={**auth_env, "MLFLOW_AUTH_ADMIN_PASSWORD": ""}, check=False)
    assert incomplete.returncode != 0 and "MLFLOW_AUTH_ADMIN_PASSWORD" in incomplete.stderr


# ------------------------------------------------------------------ Kubernetes


def test_meta_training_job_uses_c10d_rendezvous_on_pod_zero():
    docs = list(yaml.safe_load_all((INFRA / "k8s" / "meta-train-job.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "Service")
    job = next(d for d in docs if d["kind"] == "Job")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    trainer = next(c for c in pod["containers"] if c["name"] == "trainer")
    args, env = trainer["args"], {e["name"]: e.get("value") for e in trainer["env"]}
    assert args[0] == "torchrun" and "--rdzv-backend=c10d" in args
    endpoint = next(a for a in args if a.startswith("--rdzv-endpoint=")).split("=", 1)[1]
    assert endpoint == f"{job['metadata']['name']}-0.{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert int(env["NNODES"]) == spec["completions"]
    assert str(trainer["resources"]["limits"]["nvidia.com/gpu"]) == env["NPROC_PER_NODE"]
    assert args[-4:] == ["-m", "metaloop.train", "--params", "params.yaml"]
    for c in [*pod["containers"], *pod.get("initContainers", [])]:
        assert not c["image"].endswith(":latest") and ":" in c["image"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    config = list(yaml.safe_load_all((INFRA / "k8s" / "config.example.yaml").read_text()))
    pvc = next(d for d in config if d["kind"] == "PersistentVolumeClaim")
    assert claims == {pvc["metadata"]["name"]} and pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_prefect_kubernetes_work_pool_template_declares_every_placeholder():
    template = json.loads((INFRA / "k8s" / "prefect-base-job-template.json").read_text())
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    declared = set(template["variables"]["properties"])
    assert used <= declared, f"placeholders without a variable: {sorted(used - declared)}"
    assert {"image", "env", "command", "namespace"} <= used
    image = template["variables"]["properties"]["image"]["default"]
    assert ":" in image.split("/")[-1] and not image.endswith(":latest")
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == "{{ command }}"  # args, not command: the image's entry point still runs
    config = list(yaml.safe_load_all((INFRA / "k8s" / "config.example.yaml").read_text()))
    secret = next(d for d in config if d["kind"] == "Secret")
    assert template["variables"]["properties"]["env_secret"]["default"] == secret["metadata"]["name"]
    assert {"MLFLOW_TRACKING_URI", "METALOOP_DVC_REMOTE_URL", "AWS_ENDPOINT_URL"} <= set(secret["stringData"])
    assert all(v == "change-me" for k, v in secret["stringData"].items() if "SECRET" in k or "ACCESS_KEY" in k)


def test_serving_image_pins_what_an_int8_version_requires(tmp_path):
    """infra/Dockerfile's serving target installs exactly the pins a registered ONNX version's
    requirements.txt carries (tasks.registry.serving_requirements), so `--env-manager local`
    in the image is the version's own environment."""
    from tasks.registry import serving_requirements

    (tmp_path / "metaloop.json").write_text('{"format": "onnx"}')
    dockerfile = (INFRA / "Dockerfile").read_text()
    stage = dockerfile.split("FROM base AS serving", 1)[1].split("FROM ", 1)[0]
    pinned = set(re.findall(r'"([A-Za-z0-9_.-]+==[^"$]+)"', stage))
    assert pinned == set(serving_requirements(tmp_path)), (pinned, serving_requirements(tmp_path))
    assert "torch" not in stage and "COPY metaloop" not in stage
