#!/usr/bin/env python3
"""Post images to the edge server (POST /api/infer) and print its answers.

  python client.py                           # model/test/positive.png and negative.png
  python client.py a.png some/folder/        # any files, or every image under folders
  python client.py --server http://edge-box:7455 --api-key KEY

For each image it prints what was sent, the server's JSON answer and a one-line verdict, e.g.
`IDC Detected! (confidence 0.93, P(IDC) 0.9312)`; then a summary. A connection that fails
(server not up yet) is retried a bounded number of times with doubling delays; when it still
fails, the remaining images are not sent; a host name that does not resolve is not retried.
A file that cannot be read is reported and counted as failed. Exit status: 0 when every image
got an answer, 1 when any image failed, 2 for bad arguments or config (a malformed --server URL,
no images found).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
from urllib.parse import urlsplit

import requests

from idc.core.files import FORMAT_NAMES, find_images, mime_type

INFER = "/api/infer"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("images", nargs="*", help="image files or folders (default: model/test/positive.png, negative.png)")
    p.add_argument("--config", default=None, help="path to confs.json (default: the project's own)")
    p.add_argument("--server", help="server URL (default: http://Server.host:Server.port from confs.json)")
    p.add_argument("--api-key", default=os.environ.get("IDC_API_KEY"),
                   help="API key, if the server requires one (default: $IDC_API_KEY, else Server.api_key)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each answer (default: 30)")
    p.add_argument("--retries", type=int, default=4,
                   help="retries of a request the server refused to connect (default: 4)")
    p.add_argument("--backoff", type=float, default=0.5,
                   help="seconds before the first retry, doubled for each next one (default: 0.5)")
    args = p.parse_args(argv)
    if args.timeout <= 0 or args.retries < 0 or args.backoff < 0:
        p.error("--timeout must be positive, --retries and --backoff not negative")
    return args


def with_scheme(server: str) -> str:
    """host:port -> http://host:port; a string that starts with a scheme (`xyz:/`) is kept as it is."""
    return server if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:/", server) else f"http://{server}"


def check_server(server: str) -> bool:
    """Whether `server` is an http(s) URL with a host (and a valid port, if any): http://HOST:7455."""
    try:
        parts = urlsplit(with_scheme(server))
        parts.port  # raises ValueError for a port that is not a number in 0..65535
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def infer_url(server: str) -> str:
    """http://host:port[/prefix] -> .../api/infer (a URL already ending in /api/infer is kept)."""
    server = with_scheme(server).rstrip("/")
    return server if server.endswith(INFER) else server + INFER


def default_server(config) -> str:
    settings = config.Server
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(settings.host, settings.host)
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if settings.tls_cert else "http"
    return f"{scheme}://{host}:{settings.port}"


def unresolvable(url: str) -> str | None:
    """Why the server's host name does not resolve, or None: checked once, before any image is
    sent (a name that does not resolve will not start resolving by retrying)."""
    try:
        socket.getaddrinfo(urlsplit(url).hostname, None)
    except socket.gaierror as err:
        return err.strerror or str(err)
    return None


def post_image(session: requests.Session, url: str, data: bytes, content_type: str, headers: dict,
               timeout: float, retries: int, backoff: float) -> requests.Response:
    """POST one image; retry (bounded, doubling delays) only when the connection itself fails."""
    for attempt in range(retries + 1):
        try:
            return session.post(url, data=data, headers={**headers, "Content-Type": content_type},
                                timeout=timeout)
        except requests.ConnectionError:
            if attempt == retries:
                raise
            delay = backoff * 2 ** attempt
            print(f"   could not connect to {url}; retrying in {delay:.1f} s ({attempt + 1}/{retries})")
            time.sleep(delay)
    raise AssertionError("unreachable")


def verdict(answer: dict) -> str:
    """`IDC Detected! (confidence 0.93)`: the confidence in the verdict given (P(IDC) for IDC,
    1 - P(IDC) for no IDC, as inception_test.py prints it), then P(IDC) itself."""
    p = float(answer["Confidence"])
    confidence = p if answer["Results"] == 1 else 1 - p
    return (f"{answer['ResponseMessage']} (confidence {confidence:.2f}, P(IDC) {p:.4f})"
            + ("  -- needs human review" if answer.get("NeedsReview") else ""))


def reason(err: Exception) -> str:
    """The useful part of a requests error, e.g. "[Errno 111] Connection refused"."""
    found = re.search(r"\[Errno -?\d+\][^'\")]*", str(err))
    return found.group(0).strip() if found else str(err)


def is_answer(answer) -> bool:
    """A well-formed success answer of the API."""
    return (isinstance(answer, dict) and answer.get("Response") == "OK" and answer.get("Results") in (0, 1)
            and isinstance(answer.get("Confidence"), (int, float)) and isinstance(answer.get("ResponseMessage"), str))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.server is not None and not check_server(args.server):
        print(f"error: --server {args.server}: not an http(s) URL like http://HOST:7455", file=sys.stderr)
        return 2
    config = None
    if args.server is None or args.api_key is None or not args.images:
        from idc.core.config import load_config
        from idc.core.errors import ConfigError

        try:
            config = load_config(args.config)
        except ConfigError as err:
            print(f"error: {err} (or give --server, --api-key and the images)", file=sys.stderr)
            return 2
    server = args.server if args.server is not None else default_server(config)
    if not check_server(server):
        print(f"error: {server} (Server in {config.path}): not an http(s) URL like http://HOST:7455",
              file=sys.stderr)
        return 2
    url = infer_url(server)
    api_key = args.api_key if args.api_key is not None else (config.Server.api_key if config else None)
    images = find_images(args.images) if args.images else [config.model_dir / "test" / n
                                                       for n in ("positive.png", "negative.png")]
    if not images:
        print(f"error: no images found in {', '.join(args.images)} ({FORMAT_NAMES} files)",
              file=sys.stderr)
        return 2
    # The 2018 client's start-up lines (../shared/docs/ARTICLE-OUTPUT.md), once the arguments are good.
    print("!! Welcome to IDC Classification Client, please wait while the program initiates !!\n")
    print(f"-- Running on Python {sys.version}\n")
    print("-- Imported Required Modules")
    print("-- IDC Classification Client Initiated\n")
    headers = {"X-API-Key": api_key} if api_key else {}
    counts = {"IDC": 0, "no IDC": 0, "needs review": 0, "failed": 0}
    sent = 0
    why = unresolvable(url)
    if why is not None:
        print(f"!! Request failed: could not resolve the host name {urlsplit(url).hostname} ({why}); "
              f"{len(images)} image(s) not sent")
        counts["failed"], images = len(images), []
    started = time.perf_counter()
    with requests.Session() as session:
        for index, path in enumerate(images):
            try:
                data = path.read_bytes()
            except OSError as err:
                print(f"!! cannot read {path}: {err.strerror or err}")
                counts["failed"] += 1
                continue
            print(f"-- Sent {path} ({len(data)} bytes) to {url}")
            sent += 1
            content_type = mime_type(path)
            try:
                response = post_image(session, url, data, content_type, headers,
                                      args.timeout, args.retries, args.backoff)
            except requests.ConnectionError as err:
                unsent = len(images) - index
                print(f"!! Request failed: could not connect to {url} ({reason(err)}) after {args.retries} "
                      f"retries; {unsent} image(s) not sent")
                counts["failed"] += unsent
                sent -= 1  # it never reached the server
                break
            except requests.RequestException as err:
                print(f"!! Request failed: {type(err).__name__}: {reason(err)}")
                counts["failed"] += 1
                continue
            try:
                answer = response.json()
            except ValueError:
                answer = None
            print(json.dumps(answer) if answer is not None else response.text[:500])
            if response.status_code == 200 and is_answer(answer):
                review = answer.get("NeedsReview", False)
                print(verdict(answer))
                counts["IDC" if answer["Results"] == 1 else "no IDC"] += 1
                counts["needs review"] += bool(review)
            else:
                why = answer.get("ResponseMessage") if isinstance(answer, dict) else response.reason
                print(f"!! FAILED ({response.status_code}): {why}")
                counts["failed"] += 1
    total = time.perf_counter() - started
    print(f"-- Sent {sent} images in {total:.2f} s: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
