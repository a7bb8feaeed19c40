"""benchmarks/*.py --help (and bad options), run as subprocesses: the benchmarks themselves are not run."""

import ast
import os
import re
import subprocess
import sys

import pytest

from tests.paths import ROOT

SCRIPTS = ("training.py", "inference.py", "server_load.py", "ablation.py", "cluster.py")


def run_script(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *map(str, args)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "COLUMNS": "100"})


def words(text: str) -> str:
    return " ".join(text.split())


def option_help(help_text: str) -> dict:
    """{"--option": its help text} from the "options:" section of argparse's --help output."""
    section = help_text.split("\noptions:\n", 1)[1]
    entries, current = {}, None
    for line in section.splitlines():
        if not line.strip() or not line.startswith(" "):  # the end of the section
            break
        if re.match(r"  -", line):
            invocation, _, text = line.strip().partition("  ")
            current = [name.split()[0] for name in invocation.split(", ")][-1]
            entries[current] = text.strip()
        else:
            entries[current] = (entries[current] + " " + line.strip()).strip()
    return entries


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_help_is_complete(name):
    done = run_script(name, "--help")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    docstring = ast.get_docstring(ast.parse((ROOT / "benchmarks" / name).read_text()))
    for paragraph in docstring.split("\n\n"):  # the whole description, no sentence cut off
        assert words(paragraph) in words(out), f"{name} --help lacks: {paragraph}"
    usage = out.split("\n\n", 1)[0]
    in_usage = set(re.findall(r"\[(--[a-z][a-z-]*)", usage))
    assert len(in_usage) >= 3, usage
    helps = option_help(out)
    assert in_usage <= set(helps), f"options of the usage missing from the list: {in_usage - set(helps)}"
    for option in in_usage:
        assert helps[option], f"{name}: {option} has no help text"
        assert "default" in helps[option], f"{name}: {option} does not say its default: {helps[option]}"


@pytest.mark.parametrize("name, args, option", [
    ("training.py", ["--sizes", 299, 50], "--sizes"),
    ("training.py", ["--sizes", 2000], "--sizes"),
    ("inference.py", ["--rounds", 0], "--rounds"),
    ("inference.py", ["--images", -1], "--images"),
    ("inference.py", ["--batch", 0], "--batch"),
    ("inference.py", ["--batches", 0], "--batches"),
    ("server_load.py", ["--max-seconds", 0], "--max-seconds"),
    ("ablation.py", ["--variants", "everything"], "--variants"),
    ("cluster.py", ["--images", 0], "--images"),
    ("cluster.py", ["--workers", 0], "--workers"),
    ("cluster.py", ["--views", 5], "--views"),
])
def test_benchmark_rejects_bad_options_before_running(tmp_path, name, args, option):
    # A config that does not exist: were the option accepted, the script would fail on that instead.
    work = ["--work-dir", tmp_path] if name == "training.py" else []
    done = run_script(name, "--config", tmp_path / "no-such-confs.json", *work, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error:" in done.stderr and option in done.stderr.splitlines()[-1], done.stderr


def test_the_broker_benchmark_says_what_it_does_and_refuses_a_bad_count():
    done = run_script("broker_persistence.py", "--help")
    assert done.returncode == 0 and "SIGKILL" in done.stdout and "--results" in done.stdout, done.stderr
    done = run_script("broker_persistence.py", "--results", 0)
    assert done.returncode == 2 and "--results must be in 1..100000" in done.stderr, done.stderr
