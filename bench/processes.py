"""The processes a benchmark measures: started with the bench's settings, stopped whatever
happens, and read for their peak memory."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.request import urlopen

from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def bench_settings() -> Settings:
    base = Settings()
    url = base.database_url.rsplit("/", 1)[0] + "/ticketing_bench"
    return base.model_copy(
        update={
            "database_url": url,
            "broker_namespace": "bench",
            "api_port": 8801,
            "log_level": "WARNING",
            "worker_metrics_port": 0,
            "purchase_id_secret": "bench-secret-" + uuid.uuid4().hex,
        }
    )


def env_of(settings: Settings, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        env[name.upper()] = ",".join(value) if isinstance(value, list) else str(value)
    env.update(extra)
    return env


class Processes:
    """The processes under measurement; every one is stopped at the end, whatever happens."""

    def __init__(self, settings: Settings, http_processes: int) -> None:
        self.settings = settings
        self.http_processes = http_processes  # the same for the API, the baseline and bare apps
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env_of(self.settings, **env))
        self.running.append(proc)
        return proc

    def api(self) -> subprocess.Popen[bytes]:
        proc = self.start("-m", "api", API_WORKERS=str(self.http_processes))
        wait_http(f"http://127.0.0.1:{self.settings.api_port}/readyz")
        return proc

    def worker(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        return self.start("-m", "worker", WORKER_ID=name, **env)

    def uvicorn(self, app: str, port: int, *, ready_path: str = "/docs") -> subprocess.Popen[bytes]:
        proc = self.start(
            "-m",
            "uvicorn",
            app,
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--workers",
            str(self.http_processes),
        )
        wait_http(f"http://127.0.0.1:{port}{ready_path}")
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.running):
            self.stop(proc)


def wait_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up")
        time.sleep(0.1)


def peak_rss_mb(proc: subprocess.Popen[bytes]) -> float:
    """VmHWM, the peak resident set so far, of the process or of the largest of its children
    (uvicorn with several workers is a supervisor and its worker processes)."""
    pids = [proc.pid]
    for children in Path(f"/proc/{proc.pid}/task").glob("*/children"):
        pids += [int(pid) for pid in children.read_text().split()]
    peaks = [0.0]
    for pid in pids:
        status = Path(f"/proc/{pid}/status")
        if not status.exists():
            continue
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks)
