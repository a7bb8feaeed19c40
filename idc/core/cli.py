"""Command-line plumbing shared by the scripts: --config, logging, quiet start-up, friendly errors."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
from typing import Callable

from idc.core.config import DEFAULT_CONFIG, Config, load_config
from idc.core.errors import IDCError

VERBOSE_ENV = "IDC_VERBOSE"  # set by -v; read by quiet_import (also in child processes)


class ArgumentParser(argparse.ArgumentParser):
    """Bad options end as one `error:` line and exit status 2, like a bad confs.json value."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parser(description: str) -> ArgumentParser:
    p = ArgumentParser(description=description)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="path to confs.json (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging, and the libraries' own start-up messages (TensorFlow, NNCF)")
    return p


def _number_in(low: float, high: float, closed_low: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (low <= value if closed_low else low < value) or not value < high:
            raise argparse.ArgumentTypeError(f"{text} is not in {'[' if closed_low else '('}{low}, {high})")
        return value
    return parse


def add_decision_rule_options(p: argparse.ArgumentParser) -> None:
    """--threshold and --review-band: override the model bundle's decision rule on purpose."""
    p.add_argument("--threshold", type=_number_in(0.0, 1.0),
                   help="P(IDC) threshold (default: ClassifierSettings.threshold_override, else the model's)")
    p.add_argument("--review-band", type=_number_in(0.0, 0.5, closed_low=True),
                   help="needs-review band around the threshold (default: review_band_override, else the model's)")


def setup(args: argparse.Namespace) -> Config:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        # TensorFlow's C++ notices (oneDNN, "failed call to cuInit" on a machine without CUDA, which
        # reads like a failure); its Python-side errors still raise as exceptions.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        for name in ("tensorflow", "absl"):
            logging.getLogger(name).setLevel(logging.ERROR)
    return load_config(args.config)


def quiet_import(name: str):
    """Import a module whose native code writes start-up noise straight to file descriptor 2
    (TensorFlow's absl lines come before any log level applies): that output is hidden unless -v
    was given, and shown if the import fails."""
    if name in sys.modules or os.environ.get(VERBOSE_ENV):
        return importlib.import_module(name)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # read once, at import: "failed call to cuInit" etc.
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            module = importlib.import_module(name)
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    if name == "tensorflow":
        module.get_logger().setLevel(logging.ERROR)  # "Assets written to ..." on every export
    elif name == "nncf":
        module.set_log_level(logging.ERROR)  # one "Not adding activation input quantizer" line per op
    return module


def run(main: Callable[[], int | None]) -> None:
    """Run a script's main: our own errors become one clear line and exit status 2."""
    try:
        sys.exit(main() or 0)
    except IDCError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
