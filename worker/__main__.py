"""`python -m worker`: run a worker until SIGTERM/SIGINT, then drain and exit 0."""

import argparse
import asyncio
import signal

from shared.logs import configure_logging
from shared.settings import get_settings
from worker.metrics import serve_metrics
from worker.supervisor import Worker


async def run() -> None:
    settings = get_settings()
    serve_metrics(settings.worker_metrics_port)
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    await worker.run()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("command", nargs="?", default="run", choices=["run"])
    parser.parse_args()
    configure_logging(get_settings(), service="worker")
    asyncio.run(run())


if __name__ == "__main__":
    main()
