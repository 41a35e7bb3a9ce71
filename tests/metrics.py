"""Reading Prometheus metrics the way a scraper does, for tests of running processes."""

import socket
from urllib.request import urlopen


def sample(metrics_text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    wanted = {f'{key}="{value}"' for key, value in labels.items()}
    for line in metrics_text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        series, _, label_text = head.partition("{")
        if series != name:
            continue
        if wanted <= set(label_text.rstrip("}").split(",")) - {""}:
            return float(value)
    return 0.0


def scrape(port: int) -> str:
    """The metrics a process serves on 127.0.0.1:`port`/metrics."""
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
        return text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
