"""`python -m worker [run | status | dead-letters [--drop-undecodable] | replay-dead-letters]`.

run                  (default) consume partitions until SIGTERM/SIGINT, then drain and exit 0
status               each partition's owner, epoch, lease state and queue depth; dead letters
dead-letters         each dead letter: why it died, its purchases (or its bytes); all are kept,
                     but --drop-undecodable removes those nothing can replay, printed whole first
replay-dead-letters  move dead letters back to their partitions after a fix
"""

import argparse
import asyncio
import os
import signal
import sys

from shared import preflight
from shared.errors import StartupError
from shared.logs import configure_logging
from shared.settings import Settings, get_settings
from worker import admin
from worker.metrics import serve_metrics
from worker.supervisor import IdentityLost, Worker


async def run(settings: Settings) -> None:
    await preflight.check_services(settings)
    serve_metrics(settings.worker_metrics_port)
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    await worker.run()


def _install_fast_loop() -> None:
    """uvloop when installed (it comes with uvicorn[standard]): the AMQP frame handling that
    dominates a busy worker runs markedly faster on it."""
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="run",
        choices=["run", "status", "dead-letters", "replay-dead-letters"],
    )
    parser.add_argument(
        "--drop-undecodable",
        action="store_true",
        help="with dead-letters: remove the dead letters that cannot be decoded (printed first)",
    )
    args = parser.parse_args()
    command = args.command
    if args.drop_undecodable and command != "dead-letters":
        parser.error("--drop-undecodable goes with dead-letters only")
    try:
        settings = get_settings()
        configure_logging(settings, service="worker")
        if command == "status":
            admin.run_status(settings)
            sys.stdout.flush()  # here, where a closed pipe can be caught
        elif command == "replay-dead-letters":
            admin.run_replay(settings)
            sys.stdout.flush()
        elif command == "dead-letters":
            admin.run_dead_letters(settings, drop_undecodable=args.drop_undecodable)
            sys.stdout.flush()
        else:
            _install_fast_loop()
            asyncio.run(run(settings))
    except (StartupError, IdentityLost) as exc:
        raise SystemExit(f"python -m worker {command}: {exc}") from None
    except BrokenPipeError:
        # `python -m worker status | head`: the reader stopped reading, which is no error of
        # ours to report. What is left unwritten goes nowhere rather than failing at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    main()
