"""Logging for both services: one JSON object per line (python-json-logger), or plain text.

Log calls pass context as `extra={"purchase_id": ..., "event_id": ..., "partition": ...}`, which
becomes fields of the JSON line, so one purchase can be followed from the API to the worker.
The configuration is a dictConfig so uvicorn can apply it in each of its worker processes too.
"""

import logging.config
from typing import Any

from shared.settings import Settings

# Attributes every record has, plus uvicorn's colour copy of its message: not context.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


class TextFormatter(logging.Formatter):
    """Plain lines for a terminal, with the `extra` context appended as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(
            f"{key}={value}" for key, value in vars(record).items() if key not in _STANDARD
        )
        return f"{line}  {context}" if context else line


def logging_config(settings: Settings, *, service: str) -> dict[str, Any]:
    formatter: dict[str, Any]
    if settings.log_format == "json":
        formatter = {
            "()": "pythonjsonlogger.orjson.OrjsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "datefmt": "%Y-%m-%dT%H:%M:%S%z",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
            "static_fields": {"service": service},
            # Only the context is added to the line, as in text: not uvicorn's copy of its
            # message with terminal colour codes.
            "reserved_attrs": sorted(_STANDARD),
        }
    else:
        formatter = {
            "()": "shared.logs.TextFormatter",
            "fmt": "%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        }
    # The AMQP libraries narrate every frame at INFO; their warnings are what matters.
    quiet = max(logging.WARNING, logging.getLevelName(settings.log_level))
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": settings.log_level, "handlers": ["stderr"]},
        "loggers": {
            "aiormq": {"level": quiet},
            "aio_pika": {"level": quiet},
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True},
            "uvicorn.access": {"handlers": [], "propagate": True},
        },
    }


def configure_logging(settings: Settings, *, service: str) -> None:
    logging.config.dictConfig(logging_config(settings, service=service))
