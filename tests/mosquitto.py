"""A real mosquitto broker for tests: own config in a temp folder, random port, start/stop/restart."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

# name -> password for the auth broker: the users of the example ACL (examples/mosquitto/idc.acl)
TEST_USERS = {"edge": "edge-secret", "alarm": "alarm-secret", "operator": "operator-secret"}
EXAMPLE_ACL = Path(__file__).resolve().parent.parent / "examples" / "mosquitto" / "idc.acl"
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])


def find_tool(name: str) -> str | None:
    """Path of a mosquitto tool; Debian puts the broker in /usr/sbin, often not on a user's PATH."""
    return shutil.which(name, path=_SEARCH_PATH)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

# The shipped broker config's persistence settings (examples/mosquitto/idc.conf), so that the tests
# of a persistent broker test what users run.
SHIPPED_PERSISTENCE = [line for line in (Path(__file__).resolve().parents[1] / "examples" / "mosquitto" / "idc.conf")
                       .read_text().splitlines() if line.startswith(("autosave_interval", "autosave_on_changes"))]


class Mosquitto:
    """One broker process on 127.0.0.1. `users` turns on a password file and refuses anonymous clients;
    `tls` is (ca, cert, key) paths for a TLS listener; `persistence` keeps sessions across restarts;
    `acl_file` restricts what each user may publish and read (mosquitto's acl_file); `autosave=False`
    leaves out the shipped config's saving after every change (a broker set up with mosquitto's defaults)."""

    def __init__(
        self,
        workdir: Path,
        users: dict[str, str] | None = None,
        tls: tuple[Path, Path, Path] | None = None,
        persistence: bool = False,
        acl_file: Path | None = None,
        autosave: bool = True,
    ):
        self.binary = find_tool("mosquitto")
        if self.binary is None:
            raise FileNotFoundError("mosquitto is not installed (Debian: apt-get install mosquitto)")
        self.host = "127.0.0.1"
        self.port = free_port()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "mosquitto.log"
        self.config_path = self.workdir / "mosquitto.conf"
        self._process: subprocess.Popen | None = None
        self._write_config(users, tls, persistence, acl_file, autosave)

    def _write_config(self, users, tls, persistence, acl_file=None, autosave=True) -> None:
        lines = [
            f"listener {self.port} {self.host}",
            # As root, mosquitto would switch to user "mosquitto" and could not read the temp folder.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "log_dest stderr",
            "log_type error warning notice information",
            "connection_messages true",
        ]
        if users:
            password_file = self.workdir / "passwords"
            password_file.touch(mode=0o600)
            for name, password in users.items():
                subprocess.run(
                    [find_tool("mosquitto_passwd"), "-b", str(password_file), name, password],
                    check=True, capture_output=True, timeout=10,
                )
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        if acl_file:
            lines.append(f"acl_file {acl_file}")
        if tls:
            ca, cert, key = tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
        if persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/"]
            # The shipped settings, or (autosave=False) mosquitto's own: saved on a clean stop and every 30 min.
            lines += SHIPPED_PERSISTENCE if autosave else []
        else:
            lines.append("persistence false")
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 5.0) -> None:
        """Start the broker and wait (bounded) until it accepts TCP connections."""
        if self.running:
            return
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self._process.returncode}:\n{self.log()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL if it hangs); its clients see the connection drop."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=timeout)
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def crash(self) -> None:
        """Kill the broker as a power cut would (SIGKILL): it saves nothing on the way down."""
        if self.running:
            self._process.kill()
            self._process.wait(timeout=5)
        self._process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_until(predicate, timeout: float, interval: float = 0.01) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class Probe:
    """A plain paho client for tests: records every message on `topics`, publishes raw payloads."""

    def __init__(self, broker: Mosquitto, topics=("#",), username=None, password=None,
                 client_id: str = "", clean_session: bool = True, reconnect: bool = False):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[tuple[str, bytes, bool]] = []
        self.topics = list(topics)
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload, bool(m.retain)))
        self.client.on_connect = self._subscribe
        self.client.reconnect_delay_set(1, 1)
        self._subscribed = 0
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()
        if not reconnect:
            assert wait_until(lambda: self._subscribed >= len(self.topics), 5), "probe could not subscribe"

    def _subscribe(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            return
        client.on_subscribe = lambda *args: setattr(self, "_subscribed", self._subscribed + 1)
        for topic in self.topics:
            client.subscribe(topic, qos=1)

    def received(self, topic: str) -> list[bytes]:
        return [payload for t, payload, _ in list(self.messages) if t == topic]

    def wait_for(self, topic: str, payload: bytes | None = None, timeout: float = 3.0) -> bool:
        return wait_until(lambda: any(payload is None or p == payload for p in self.received(topic)), timeout)

    def publish(self, topic: str, payload: bytes | str, timeout: float = 3.0) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_retained(broker: Mosquitto, topic: str, payload: bytes, timeout: float = 5.0) -> bool:
    """Whether the broker comes to hold `payload` as the retained message of `topic` within
    `timeout`: each try subscribes afresh and looks only at messages flagged retained (a client
    that is connected may not have had its retained publish stored by the broker yet)."""
    deadline = time.monotonic() + timeout
    while True:
        probe = Probe(broker, [topic])
        try:
            if wait_until(lambda: (topic, payload, True) in probe.messages, 0.5):
                return True
        finally:
            probe.close()
        if time.monotonic() >= deadline:
            return False
