"""`python -m worker`: run a worker until SIGTERM/SIGINT, then drain and exit 0."""

import argparse
import asyncio
import logging
import signal

from shared.settings import get_settings
from worker.supervisor import Worker


async def run() -> None:
    worker = Worker(get_settings())
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    await worker.run()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("command", nargs="?", default="run", choices=["run"])
    parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    asyncio.run(run())


if __name__ == "__main__":
    main()
