"""Structured logs: JSON lines on stderr with node, actor and pid on every line.

The actors of a node usually share one stderr file, so each line goes out as
one write, newline included (structlog's PrintLogger writes the newline
separately, and two processes' lines could interleave).
"""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure(node: str, actor: str, level: str = "info") -> structlog.stdlib.BoundLogger:
    logging.basicConfig(stream=sys.stderr, format="%(message)s", level=getattr(logging, level.upper(), logging.INFO))
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger().bind(node=node, actor=actor, pid=os.getpid())
