"""expblip's console: one logger tree (``expblip.*``), every line printed once, as ``[expblip] message``.

    from expblip.log import get_logger, setup_logging
    setup_logging(rank)                 # entry points and training processes, once
    log = get_logger(__name__)          # any module: log.info(...), log.warning(...)

Only rank 0 talks to the outside world: it logs INFO and up; other ranks log warnings and errors only. The tree does
not propagate to the root logger, so a host that also prints the root logger (Ray Train V2 workers configure one,
and patch ``print`` to go both to stdout and through it) shows each line once. ``handler`` replaces the stdout
handler, e.g. to relay lines from Ray workers to the driver (expblip.train.ray_job).
"""

from __future__ import annotations

import logging
import sys

ROOT = "expblip"
FORMAT = "[expblip] %(message)s"


def get_logger(name: str) -> logging.Logger:
    """The logger of a module under the ``expblip`` tree (``__name__`` of any expblip module works as is)."""
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")


def setup_logging(rank: int = 0, handler: logging.Handler | None = None, level: int | None = None) -> logging.Logger:
    """Configure the ``expblip`` tree for this process (idempotent: the previous handler is replaced)."""
    logger = logging.getLogger(ROOT)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    handler = handler or logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level if level is not None else (logging.INFO if rank == 0 else logging.WARNING))
    logger.propagate = False
    return logger
