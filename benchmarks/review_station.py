#!/usr/bin/env python3
"""Time the review station: a 100-patch zip classified and shown in a real browser, and the pages' first paint.

  python benchmarks/review_station.py                      # model/ir/FP16, a real patient of ../shared
  python benchmarks/review_station.py --precision INT8 --patches 100 --rounds 5

Starts server.py (the precision given, default OpenVINO.precision) on a free port of 127.0.0.1, its
review queue in a temporary folder; zips `--patches` patches of one patient of the dataset
(../shared/data/idc-patches, Kaggle layout), or synthetic ones where that is absent; then, in
Debian's headless chromium driven by selenium: drops the zip on the page and times it until every
verdict is shown and the mosaic drawn (`--rounds` times; the queue is cleared in between by a new
database), and reads the first paint of `/` and `/review` from the browser's paint timing. Also
times the zip through the API alone (requests, no browser). Targets: zip <= 5 s, first paint
<= 300 ms. Exit status 0 when both are met, 1 when not, 2 when there is no model or no browser.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HOST = "127.0.0.1"
DATASET = ROOT.parent / "shared" / "data" / "idc-patches"
TARGETS = {"zip_seconds": 5.0, "first_paint_ms": 300.0}


def parse_args(argv=None) -> argparse.Namespace:
    summary, _, details = __doc__.strip().partition("\n")
    p = argparse.ArgumentParser(description=summary, epilog=details,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "confs.json"), help="confs.json (default: %(default)s)")
    p.add_argument("--precision", choices=["FP32", "FP16", "INT8"], help="IR to serve (default: what server.py serves, OpenVINO.precision)")
    p.add_argument("--data", default=str(DATASET), help="Kaggle-layout dataset to take a patient from "
                                                        "(default: %(default)s)")
    p.add_argument("--patches", type=int, default=100, help="patches in the zip (default: 100)")
    p.add_argument("--rounds", type=int, default=3, help="timed drops of the zip (default: 3)")
    args = p.parse_args(argv)
    if not (0 < args.patches <= 1000 and 0 < args.rounds <= 50):
        p.error("--patches must be in 1..1000, --rounds in 1..50")
    return args


def patient_zip(data: Path, count: int, folder: Path) -> tuple[Path, str]:
    """A zip of `count` patches of the dataset's patient with the most (synthetic when absent)."""
    if data.is_dir():
        patients = sorted((len(list(p.rglob("*.png"))), p.name) for p in data.iterdir() if p.is_dir())
        patches, patient = patients[-1]
        root, chosen = data, sorted((data / patient).rglob("*.png"))
        if patches < count:  # take patches of several patients then
            chosen = sorted(data.rglob("*.png"))
    else:
        import importlib.util  # tests/synthetic.py by its path: the tests are no installed package

        spec = importlib.util.spec_from_file_location("synthetic", ROOT / "tests" / "synthetic.py")
        spec.loader.exec_module(synthetic := importlib.util.module_from_spec(spec))
        make_dataset = synthetic.make_dataset

        root = make_dataset(folder / "synthetic", patients=1, per_class=(count + 1) // 2)
        chosen, patient = sorted(root.rglob("*.png")), "9000"
    path = folder / "patient.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for png in chosen[:count]:
            archive.write(png, png.relative_to(root))
    return path, patient


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(config_path: Path, precision: str | None, folder: Path, port: int) -> subprocess.Popen:
    import requests

    raw = json.loads(config_path.read_text())
    raw["ClassifierSettings"]["model_dir"] = str((config_path.parent / raw["ClassifierSettings"]["model_dir"]).resolve())
    raw["Server"].update(host=HOST, port=port, api_key=None, archive_dir=None, tls_cert=None, tls_key=None,
                         review_db=str(folder / f"review-{time.monotonic_ns()}.sqlite3"))
    raw["IoTJumpWay"]["enabled"] = False
    bench_config = folder / "confs.json"
    bench_config.write_text(json.dumps(raw, indent=2))
    command = [sys.executable, str(ROOT / "server.py"), "--config", str(bench_config)]
    command += ["--precision", precision] if precision else []
    log = (folder / "server.log").open("a")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(f"http://{HOST}:{port}/api/health", timeout=2).status_code == 200:
                return process
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"server.py did not start:\n{(folder / 'server.log').read_text()[-3000:]}")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1150,900",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='idc-bench-chromium-')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
                              options=options)
    driver.set_page_load_timeout(60)
    return driver


def first_paint_ms(driver, url: str) -> float:
    driver.get(url)
    for _ in range(100):
        paints = driver.execute_script(
            "return Object.fromEntries(performance.getEntriesByType('paint').map(e => [e.name, e.startTime]));")
        if "first-contentful-paint" in paints:
            return paints["first-contentful-paint"]
        time.sleep(0.05)
    raise RuntimeError(f"no paint timing for {url}")


def drop_zip_seconds(driver, base: str, archive: Path, patches: int) -> float:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(base + "/")
    driver.execute_script("""const i = document.createElement('input'); i.type = 'file'; i.id = 'bench-src';
        i.style.display = 'none'; document.body.appendChild(i);""")
    driver.find_element(By.ID, "bench-src").send_keys(str(archive))
    started = time.perf_counter()  # the drop is dispatched in the next call: time from here to all shown
    driver.execute_script("""const t = new DataTransfer(); t.items.add(document.getElementById('bench-src').files[0]);
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: t, bubbles: true}));""")
    WebDriverWait(driver, 120, poll_frequency=0.02).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results tbody tr")) == patches
        and d.find_element(By.ID, "status").text.startswith("done"))
    return time.perf_counter() - started


def main(argv=None) -> int:
    args = parse_args(argv)
    import requests

    from idc.core.config import load_config
    from idc.edge.engine import served_precision

    config = load_config(args.config)
    precision = args.precision or served_precision(config)
    if not config.model.ir_xml(precision).exists():
        print(f"no compiled model at {config.model.ir_xml(precision)}: run ./compile_ncs.sh first", file=sys.stderr)
        return 2
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        print("Debian's chromium and chromedriver are needed: apt-get install chromium chromium-driver",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="idc-bench-review-") as tmp:
        folder = Path(tmp)
        archive, patient = patient_zip(Path(args.data), args.patches, folder)
        port = free_port()
        base = f"http://{HOST}:{port}"
        process = start_server(Path(args.config).resolve(), precision, folder, port)
        driver = None
        try:
            data = archive.read_bytes()
            api = []
            for _ in range(args.rounds):
                started = time.perf_counter()
                answer = requests.post(f"{base}/api/infer/batch", data=data,
                                       headers={"Content-Type": "application/zip"}, timeout=120).json()
                api.append(time.perf_counter() - started)
                assert answer["Count"] == args.patches and answer["Failed"] == 0, answer["ResponseMessage"]
            driver = browser()
            paints = {page: [first_paint_ms(driver, base + page) for _ in range(args.rounds + 2)][2:]
                      for page in ("/", "/review")}
            shown = [drop_zip_seconds(driver, base, archive, args.patches) for _ in range(args.rounds)]
        finally:
            if driver is not None:
                driver.quit()
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)
    figures = {
        "precision": precision, "patches": args.patches, "patient": patient, "zip_bytes": len(data),
        "api_seconds_median": round(statistics.median(api), 3),
        "zip_seconds_median": round(statistics.median(shown), 3), "zip_seconds_max": round(max(shown), 3),
        "first_paint_ms": {page: round(statistics.median(values), 1) for page, values in paints.items()},
    }
    print(json.dumps(figures, indent=2))
    met = (figures["zip_seconds_max"] <= TARGETS["zip_seconds"]
           and max(figures["first_paint_ms"].values()) <= TARGETS["first_paint_ms"])
    print(f"{args.patches}-patch zip shown in {figures['zip_seconds_median']} s (median of {args.rounds}; "
          f"API alone {figures['api_seconds_median']} s); first paint / {figures['first_paint_ms']['/']} ms, "
          f"/review {figures['first_paint_ms']['/review']} ms: targets {'met' if met else 'MISSED'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
