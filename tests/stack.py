"""A real operations stack on this machine, for tests/test_stack.py: a Postgres server (Debian's
`postgresql` binaries) on 127.0.0.1, the Prefect server and the MLflow server on it, `dagtune deploy` and
a process worker on the pool. Everything is started in its own process group and stopped at teardown."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PG_BIN = Path("/usr/lib/postgresql")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin(name: str) -> str:
    found = sorted(PG_BIN.glob(f"*/bin/{name}"))
    if not found:
        raise FileNotFoundError(f"{name} not found under {PG_BIN}: apt-get install postgresql (see .ci/run)")
    return str(found[-1])


def _as_postgres(cmd: list[str]) -> list[str]:
    """Postgres refuses to run as root: as root, run it as the `postgres` user the package created."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def wait_http(
    url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{url}: process exited {proc.returncode}: {log.read_text()[-3000:] if log else ''}"
            )
        try:
            if httpx.get(url, timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout}s: {log.read_text()[-3000:] if log else ''}")


@dataclass
class Stack:
    root: Path
    env: dict[str, str]
    config: Path
    prefect_url: str
    mlflow_url: str
    deployment_id: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    pg_dir: Path | None = None

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(
            cmd, cwd=ROOT, env=env or self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs[name] = p
        return p

    def stop(self, name: str) -> None:
        self.stop_together([name])

    def stop_together(self, names: list[str]) -> None:
        """SIGTERM to all of them first, then wait for each: their shutdowns overlap (test time)."""
        procs = [p for p in (self.procs.pop(n, None) for n in names) if p is not None and p.poll() is None]
        for p in procs:
            os.killpg(p.pid, 15)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "dagtune.cli", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def api(self, method: str, path: str, **kw) -> dict | list:
        r = httpx.request(method, f"{self.prefect_url}/api{path}", timeout=30, **kw)
        r.raise_for_status()
        return r.json() if r.content else {}

    def wait_flow_run(self, flow_run_id: str, timeout: float) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            fr = self.api("GET", f"/flow_runs/{flow_run_id}")
            if fr["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return fr
            time.sleep(3)
        raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout}s: {self.worker_log()}")

    def worker_log(self) -> str:
        p = self.root / "worker.log"
        return p.read_text()[-4000:] if p.exists() else ""


def start_postgres(stack: Stack) -> str:
    """initdb + pg_ctl start in a fresh directory; databases `prefect` and `mlflow`. Returns host:port."""
    d = Path(tempfile.mkdtemp(prefix="dagtune-pg-"))  # under /tmp: the postgres user can reach it
    stack.pg_dir = d
    if os.geteuid() == 0:
        shutil.chown(d, "postgres", "postgres")
    port = free_port()
    data = d / "data"
    subprocess.run(
        _as_postgres([pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]),
        check=True,
        capture_output=True,
    )
    subprocess.run(
        _as_postgres(
            [
                pg_bin("pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(d / "pg.log"),
                "-w",
                "-t",
                "60",
                "-o",
                f"-p {port} -k {d} -c listen_addresses=127.0.0.1",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    for db in ("prefect", "mlflow"):
        subprocess.run(
            _as_postgres([pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db]),
            check=True,
            capture_output=True,
        )
    return f"127.0.0.1:{port}"


def stop_postgres(stack: Stack) -> None:
    if stack.pg_dir is None:
        return
    subprocess.run(
        _as_postgres([pg_bin("pg_ctl"), "-D", str(stack.pg_dir / "data"), "-m", "fast", "stop"]),
        capture_output=True,
    )
    shutil.rmtree(stack.pg_dir, ignore_errors=True)


def start_servers(stack: Stack, pg: str) -> None:
    prefect_port = int(stack.prefect_url.rsplit(":", 1)[1])
    penv = {
        **stack.env,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://postgres@{pg}/prefect",
        "PREFECT_HOME": str(stack.root / "prefect-server"),
        "PREFECT_UI_API_URL": f"{stack.prefect_url}/api",
    }
    penv.pop("PREFECT_API_URL")
    p = stack.start(
        "prefect",
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(prefect_port),
        ],
        penv,
    )
    mlflow_port = int(stack.mlflow_url.rsplit(":", 1)[1])
    m = stack.start(
        "mlflow",
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--backend-store-uri",
            f"postgresql://postgres@{pg}/mlflow",
            "--artifacts-destination",
            str(stack.root / "mlflow-artifacts"),
            "--allowed-hosts",
            f"127.0.0.1:{mlflow_port},localhost:{mlflow_port}",
        ],
    )
    wait_http(f"{stack.prefect_url}/api/health", 180, p, stack.root / "prefect.log")
    wait_http(f"{stack.mlflow_url}/health", 180, m, stack.root / "mlflow.log")


def deploy_and_start_worker(stack: Stack) -> None:
    r = stack.cli("deploy", "--config", str(stack.config), "--json")
    if r.returncode != 0:
        raise RuntimeError(f"dagtune deploy failed: {r.stderr[-3000:]}")
    stack.deployment_id = json.loads(r.stdout)["deployment_id"]
    stack.start("worker", [sys.executable, "-m", "dagtune.cli", "worker", "--config", str(stack.config)])
