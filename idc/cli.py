"""Command-line plumbing shared by the scripts: --config, logging, friendly errors."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from idc.config import DEFAULT_CONFIG, Config, load_config
from idc.errors import IDCError


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="path to confs.json (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def setup(args: argparse.Namespace) -> Config:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up noise out
    return load_config(args.config)


def run(main: Callable[[], int | None]) -> None:
    """Run a script's main: our own errors become one clear line and exit status 2."""
    try:
        sys.exit(main() or 0)
    except IDCError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
