"""client.py, run as a subprocess against a real waitress server (and a dead one)."""

import importlib.util
import re
import subprocess
import sys
import time

import pytest

from idc.edge.web.app import create_app
from tests.paths import ROOT
from tests.mosquitto import free_port

KEY = "client-test-key"


def run_client(*args, timeout=60):
    return subprocess.run([sys.executable, str(ROOT / "client.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def client(monkeypatch):
    """client.py itself (a script beside the package, not part of it), imported by its path."""
    spec = importlib.util.spec_from_file_location("client", ROOT / "client.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "client", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def server_url(live_server, make_config, tiny_classifier):
    """server_url(**Server keys) -> the URL of the tiny model served by waitress on 127.0.0.1."""
    def start(**server):
        config = make_config(Server=server)
        return live_server(create_app(config, tiny_classifier), config)

    return start


def test_client_posts_the_two_test_images_by_default(tiny_project, server_url):
    config, _ = tiny_project
    done = run_client("--config", config.path, "--server", server_url())
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for name in ("positive.png", "negative.png"):
        assert f"-- Sent {config.model_dir / 'test' / name}" in out
    assert '"Response": "OK"' in out and '"Results": 1' in out and '"Results": 0' in out
    assert re.search(r"^IDC Detected! \(confidence (0\.[5-9]\d|1\.00), P\(IDC\) [01]\.\d{4}\)$", out, re.M), out
    assert re.search(r"^IDC Not Detected! \(confidence (0\.[5-9]\d|1\.00), P\(IDC\) 0\.\d{4}\)$", out, re.M), out
    assert "-- Sent 2 images in" in out and "IDC: 1, no IDC: 1" in out and "failed: 0" in out


def test_client_takes_files_and_folders_and_fails_on_a_bad_image(tiny_project, server_url, tmp_path):
    config, _ = tiny_project
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    positive = (config.model_dir / "test" / "positive.png").read_bytes()
    (folder / "a.png").write_bytes(positive)
    (folder / "sub" / "b.PNG").write_bytes((config.model_dir / "test" / "negative.png").read_bytes())
    (folder / "notes.txt").write_text("not an image: skipped")
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(positive[:100])
    url = server_url()
    done = run_client("--server", url, folder)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("-- Sent ") == 3 and "notes.txt" not in done.stdout  # 2 images + the summary
    assert "IDC: 1, no IDC: 1" in done.stdout

    done = run_client("--server", url + "/api/infer", folder / "a.png", bad, tmp_path / "missing.png")
    assert done.returncode == 1
    assert '"Response": "FAILED"' in done.stdout and "!! FAILED (400): corrupt image data" in done.stdout
    assert f"!! cannot read {tmp_path / 'missing.png'}: No such file or directory" in done.stdout
    assert "-- Sent 2 images in" in done.stdout  # the missing file is not counted as sent
    assert "IDC: 1" in done.stdout and "failed: 2" in done.stdout


def test_client_api_key(tiny_project, server_url):
    config, _ = tiny_project
    url = server_url(api_key=KEY)
    images = [config.model_dir / "test" / "positive.png"]
    done = run_client("--server", url, "--api-key", KEY, *images)
    assert done.returncode == 0 and "IDC Detected!" in done.stdout
    done = run_client("--server", url, *images)
    assert done.returncode == 1 and "!! FAILED (401): API key required" in done.stdout
    done = run_client("--server", url, "--api-key", "wrong", *images)
    assert done.returncode == 1 and "!! FAILED (401): wrong API key" in done.stdout


def test_client_gives_up_on_a_dead_server_after_bounded_retries(tiny_project):
    config, _ = tiny_project
    started = time.monotonic()
    done = run_client("--config", config.path, "--server", f"http://127.0.0.1:{free_port()}",
                      "--retries", 2, "--backoff", 0.05, "--timeout", 2)
    assert done.returncode == 1
    assert done.stdout.count("retrying in") == 2  # then it gives up: the second image is not sent
    assert "Connection refused) after 2 retries; 2 image(s) not sent" in done.stdout
    assert done.stdout.count("-- Sent ") == 2 and "failed: 2" in done.stdout  # 1 image + the summary
    assert time.monotonic() - started < 30


def test_client_help_and_bad_arguments():
    done = run_client("--help")
    assert done.returncode == 0 and "--server" in done.stdout and "--api-key" in done.stdout
    assert "--timeout" in done.stdout and "--retries" in done.stdout
    assert run_client("--timeout", "0").returncode == 2
    done = run_client("--config", "/no/such/confs.json")
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_default_server_url_comes_from_confs_json(make_config, client):
    assert client.default_server(make_config()) == "http://127.0.0.1:7455"
    assert client.default_server(make_config(Server={"host": "0.0.0.0", "port": 8080})) == "http://127.0.0.1:8080"
    assert client.infer_url("edge-box:7455") == "http://edge-box:7455/api/infer"
    assert client.infer_url("https://edge/api/infer/") == "https://edge/api/infer"


def test_retries_back_off_and_recover(monkeypatch, client):
    import requests

    class FlakySession:
        calls = 0

        def post(self, url, **kwargs):
            self.calls += 1
            if self.calls <= 3:
                raise requests.ConnectionError("[Errno 111] Connection refused")
            return "answer"

    delays = []
    monkeypatch.setattr(client.time, "sleep", delays.append)
    session = FlakySession()
    assert client.post_image(session, "http://x/api/infer", b"img", "image/png", {}, 5, 4, 0.5) == "answer"
    assert delays == [0.5, 1.0, 2.0] and session.calls == 4
    with pytest.raises(requests.ConnectionError):  # bounded: retries + 1 attempts, then the error
        client.post_image(FlakySession(), "http://x/api/infer", b"img", "image/png", {}, 5, 2, 0.5)


def dead_server():
    """A URL on 127.0.0.1 where nothing listens: any request to it would be refused."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.mark.parametrize("content", [None, "notes.txt"])
def test_client_says_why_when_no_images_are_found(tmp_path, content):
    folder = tmp_path / "empty"
    folder.mkdir()
    if content:
        (folder / content).write_text("not an image")
    done = run_client("--server", dead_server(), folder)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip() == f"error: no images found in {folder} (PNG, JPEG, BMP or TIFF files)"
    assert done.stdout == ""  # no summary, no request


def test_client_counts_an_unreadable_file_as_failed_not_sent(tmp_path):
    missing = tmp_path / "missing.png"
    done = run_client("--server", dead_server(), "--retries", 0, missing)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"!! cannot read {missing}: No such file or directory" in done.stdout
    assert "retrying" not in done.stdout and "Request failed" not in done.stdout  # nothing was posted
    assert "-- Sent 0 images in" in done.stdout and "failed: 1" in done.stdout


def test_client_sends_the_readable_images_beside_a_missing_one(tiny_project, server_url, tmp_path):
    config, _ = tiny_project
    missing = tmp_path / "gone.png"
    done = run_client("--server", server_url(), missing, config.model_dir / "test" / "positive.png")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"!! cannot read {missing}: No such file or directory" in done.stdout
    assert "-- Sent 1 images in" in done.stdout and "IDC: 1, no IDC: 0" in done.stdout and "failed: 1" in done.stdout


@pytest.mark.parametrize("server", ["htp:/foo", "http:/foo", "ftp://edge-box:7455", "http://", "https://:7455",
                                    "http://edge-box:port", "file:///tmp/x", "//edge-box:7455"])
def test_client_rejects_a_malformed_server_url_up_front(tmp_path, server):
    image = tmp_path / "a.png"
    image.write_bytes(b"not sent")
    started = time.monotonic()
    done = run_client("--server", server, image)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip() == f"error: --server {server}: not an http(s) URL like http://HOST:7455"
    assert done.stdout == ""  # no request attempted
    assert time.monotonic() - started < 20


def test_well_formed_server_urls_are_accepted(client):
    for server in ("edge-box:7455", "http://edge-box:7455", "https://edge-box/prefix/", "127.0.0.1:7455",
                   "[::1]:7455", "http://[::1]:7455/api/infer", "localhost"):
        assert client.check_server(server), server
    for server in ("htp:/foo", "http:/foo", "ftp://edge-box", "http://", "http://edge-box:99999", ""):
        assert not client.check_server(server), server


def test_client_fails_at_once_when_the_host_name_does_not_resolve(tmp_path):
    images = []
    for name in ("a.png", "b.png"):
        images.append(tmp_path / name)
        images[-1].write_bytes(b"never sent")
    started = time.monotonic()
    done = run_client("--server", "http://no-such-host.invalid:7455", "--retries", 4, "--backoff", 1, *images)
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr
    assert "retrying" not in done.stdout  # a name that does not resolve is not retried
    assert "could not resolve the host name no-such-host.invalid" in done.stdout
    assert "2 image(s) not sent" in done.stdout and "failed: 2" in done.stdout
    assert elapsed < 15  # 4 retries at 1, 2, 4, 8 s would take 15 s
