"""The 2018 article's console lines (transcripts in ../shared/docs/ARTICLE-OUTPUT.md), for server.py and
inception_test.py. These are the user-facing lines on stdout; logging stays logging (stderr).

Where the scripts print more than the article (review flags, summaries), it comes after these lines.
"""

from __future__ import annotations

import sys
import threading
import time
from datetime import datetime

from idc.core.errors import ImageError

_write_lock = threading.Lock()  # request threads and paho's thread print: one block at a time


def say(*lines: str) -> None:
    """Print lines as one block (never interleaved with another thread's block)."""
    with _write_lock:
        sys.stdout.write("".join(f"{line}\n" for line in lines))
        sys.stdout.flush()


def _stamp(at: datetime | None) -> str:
    return (at or datetime.now()).isoformat(" ", timespec="microseconds")  # 2018-04-24 14:14:26.780554


def started(at: datetime | None = None) -> str:
    return f"-- STARTED: :  {_stamp(at)}"


def ended(at: datetime | None = None) -> str:
    return f"-- ENDED:  {_stamp(at)}"


def identified(prediction) -> list[str]:
    """`TASS Identified IDC with a confidence of 0.945` and a blank line; nothing for no IDC (as in the article)."""
    if not prediction.label:
        return []
    return [f"TASS Identified IDC with a confidence of {prediction.p_idc:.4g}", ""]


def top2(prediction, device: str, classes=("0", "1")) -> list[str]:
    """`inception-v3 on <device>`, then `<class> <class name> <probability>` for both classes, best first."""
    probabilities = {0: 1.0 - prediction.p_idc, 1: prediction.p_idc}
    ranked = sorted(probabilities, key=probabilities.get, reverse=True)
    return [f"inception-v3 on {device}", *(f"{c} {classes[c]} {probabilities[c]:.4g}" for c in ranked)]


def review_note(prediction) -> list[str]:
    return [f"-- Needs human review: P(IDC) {prediction.p_idc:.4f} is close to the threshold"] \
        if prediction.needs_review else []


def published(mid: int, channel: str) -> None:
    """The server's lines for a message the broker acknowledged (ResultPublisher's on_published)."""
    say(f"-- Published: {mid}", f"-- Published to Device {channel} Channel", "")


class ConsoleClassifier:
    """Wraps the server's classifier: prints the article's block for every request it classifies."""

    def __init__(self, classifier):
        self._classifier = classifier
        self._device = classifier.describe().get("device", classifier.backend)

    def __getattr__(self, name):
        return getattr(self._classifier, name)

    def classify(self, source):
        request_started, began = datetime.now(), time.perf_counter()
        try:
            prediction = self._classifier.classify(source)
        except ImageError as err:
            say(started(request_started), "", "-- Loading Sample", f"!! Could not load the sample: {err}", "")
            raise
        inference_ended = datetime.now()
        inference_started = datetime.fromtimestamp(inference_ended.timestamp() - prediction.seconds)
        say(started(request_started), "", "-- Loading Sample", "-- Loaded Sample", started(inference_started), "",
            ended(inference_ended), f"-- TIME: {prediction.seconds}", "", *identified(prediction),
            *top2(prediction, self._device), *review_note(prediction), "",
            ended(), "-- TESTED:  1", f"-- TIME(secs): {time.perf_counter() - began}", "")
        return prediction
