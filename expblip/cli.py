"""What every entry script shares: `--config FILE` + dotted overrides, and clean exits on configuration errors."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from expblip.config import Config, ConfigError, load_config
from expblip.log import setup_logging


def config_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with config sections (model, data, optim, train, tracking, ray)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 train.max_steps=50")
    return parser


def parse_config(args: argparse.Namespace, extra: list[str] | None = None) -> Config:
    return load_config(args.config, list(args.overrides) + list(extra or []))


def run_main(fn: Callable[[], object]) -> int:
    """Set up the console (expblip.log: rank 0 logs, other ranks warn) and call fn; configuration and input errors
    print one clear line and exit 2 (no traceback)."""
    setup_logging(int(os.environ.get("RANK", "0") or 0))
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow's store-creation notes would bury our lines
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # and transformers' "Loading weights" bar, each load
    try:
        fn()
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
