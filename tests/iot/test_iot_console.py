"""The scripts as real processes with MQTT on (real mosquitto): each program has its own MQTT identity
(inception_test.py never touches the server's Status), and the 2018 article's console lines
(../shared/docs/ARTICLE-OUTPUT.md) appear line for line where the article shows them."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import requests

from idc.core.config import load_config
from tests.paths import ROOT
from tests.mosquitto import Probe, free_port, wait_retained, wait_until

SERVER, TESTER = "IDC/Devices/Lab/EdgeServer", "IDC/Devices/Lab/InceptionTest"
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}"
NUMBER = r"\d+(\.\d+)?(e-?\d+)?"
P = r"\d(\.\d+)?(e-\d+)?"  # a probability, however it prints (5e-07, 0.93, 1.0)


def matches_in_order(lines: list[str], patterns: list[str]) -> bool:
    """Whether `patterns` match consecutive lines somewhere in `lines` (each pattern a full-line regex)."""
    return any(all(re.fullmatch(p, line) for p, line in zip(patterns, lines[i:i + len(patterns)]))
               for i in range(len(lines) - len(patterns) + 1))


@pytest.fixture
def project(tiny_project, tiny_classifier, mosquitto, tmp_path):
    """The tiny trained project (FP16 IR compiled), with MQTT on and pointed at the test broker."""
    config, _ = tiny_project
    raw = json.loads(config.path.read_text())
    raw["IoTJumpWay"].update(enabled=True, host=mosquitto.host, port=mosquitto.port)
    raw["Server"].update(port=free_port())
    path = tmp_path / "confs.json"
    path.write_text(json.dumps(raw))
    return load_config(path)


@pytest.fixture
def server(project, tmp_path):
    """server.py as a process; yields (url, stdout path); stopped with SIGTERM."""
    out = tmp_path / "server.out"
    with out.open("wb") as stdout, (tmp_path / "server.err").open("wb") as stderr:
        process = subprocess.Popen([sys.executable, str(ROOT / "server.py"), "--config", str(project.path),
                                    "--precision", "FP16"], stdout=stdout, stderr=stderr,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{project.Server.port}"

    def up():
        try:
            return requests.get(f"{url}/api/health", timeout=1).json()["mqtt"]["connected"]
        except (requests.RequestException, ValueError):
            return process.poll() is not None
    try:
        assert wait_until(up, 60, 0.2) and process.poll() is None, (tmp_path / "server.err").read_text()
        yield url, out
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def run(*args, timeout=120):
    done = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_inception_test_has_its_own_identity_and_leaves_the_servers_status_online(project, server, mosquitto):
    # The server has connected before the probe listens, so all the probe sees of it is retained.
    assert wait_retained(mosquitto, f"{SERVER}/Status", b"ONLINE")
    probe = Probe(mosquitto, ["IDC/Devices/#"])
    try:
        run(ROOT / "inception_test.py", "--config", project.path, "--precision", "FP16")
        # The server's Status was never touched; the tester said goodbye on its own Status.
        assert wait_retained(mosquitto, f"{SERVER}/Status", b"ONLINE")
        assert wait_retained(mosquitto, f"{TESTER}/Status", b"OFFLINE")
        live = [(t, p) for t, p, was_retained in probe.messages if t.startswith(SERVER) and not was_retained]
        assert live == [], live  # nothing was published as the server
        assert [json.loads(p)["SensorID"] for p in probe.received(f"{TESTER}/Sensors")] == ["InceptionTest"] * 2
        url, _ = server
        assert requests.get(f"{url}/api/health", timeout=5).json()["mqtt"]["connected"] is True
    finally:
        probe.close()


def test_the_articles_console_lines_from_real_runs(project, server, tiny_project):
    url, server_out = server
    test = project.model_dir / "test"

    client = run(ROOT / "client.py", "--server", url, test / "positive.png", test / "negative.png").splitlines()
    assert matches_in_order(client, [
        re.escape("!! Welcome to IDC Classification Client, please wait while the program initiates !!"), "",
        r"-- Running on Python 3\.\d+\.\d+ .*"])
    assert matches_in_order(client, ["-- Imported Required Modules", "-- IDC Classification Client Initiated", ""])

    # The server's block for the positive request, and the broker's acknowledgements.
    assert wait_until(lambda: server_out.read_text().count("-- Published to Device") >= 3, 5), server_out.read_text()
    lines = server_out.read_text().splitlines()
    assert matches_in_order(lines, [
        f"-- STARTED: :  {STAMP}", "", "-- Loading Sample", "-- Loaded Sample", f"-- STARTED: :  {STAMP}", "",
        f"-- ENDED:  {STAMP}", f"-- TIME: {NUMBER}", "", rf"TASS Identified IDC with a confidence of {P}", ""]), lines
    assert matches_in_order(lines, ["inception-v3 on CPU", f"1 1 {P}", f"0 0 {P}", "",
                                    f"-- ENDED:  {STAMP}", "-- TESTED:  1", rf"-- TIME\(secs\): {NUMBER}"]), lines
    assert matches_in_order(lines, [r"-- Published: \d+", "-- Published to Device Sensors Channel", ""]), lines
    assert matches_in_order(lines, [r"-- Published: \d+", "-- Published to Device Warnings Channel", ""]), lines
    assert lines.count("TASS Identified IDC with a confidence of " + lines[lines.index("inception-v3 on CPU") + 1]
                       .split()[2]) == 1  # the TASS line and the top-2 line agree; only the positive has one

    tested = run(ROOT / "inception_test.py", "--config", project.path, "--precision", "FP16").splitlines()
    negative, positive = test / "negative.png", test / "positive.png"
    assert matches_in_order(tested, [
        re.escape(f"-- Loaded Test Image {negative}"), "", f"-- STARTED: :  {STAMP}", "",
        f"-- ENDED:  {STAMP}", f"-- TIME: {NUMBER}", "", "inception-v3 on CPU", f"0 0 {P}", f"1 1 {P}"]), tested
    assert matches_in_order(tested, [
        re.escape(f"-- Loaded Test Image {positive}"), "", f"-- STARTED: :  {STAMP}", "",
        f"-- ENDED:  {STAMP}", f"-- TIME: {NUMBER}", "", rf"TASS Identified IDC with a confidence of {P}", "",
        "-- Published to Device Sensors Channel", "", "inception-v3 on CPU", f"1 1 {P}", f"0 0 {P}"]), tested
    assert matches_in_order(tested, [f"-- ENDED:  {STAMP}", "-- TESTED:  2", rf"-- TIME\(secs\): {NUMBER}"]), tested
