"""The README's commands run as written after its set-up line: in a fresh clone, with the
virtual environment the set-up line makes, and with the main command's options carried over."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.paths import ROOT

README = (ROOT / "README.md").read_text()
PAGES = {path.relative_to(ROOT).as_posix(): path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
COMMAND = re.compile(r"(?:\.venv/bin/python|\./compile_ncs\.sh)(?: [^\n`|#]*)?")


def test_readme_commands_use_the_venv_of_the_setup_line():
    """A bare `python script.py` fails after the set-up line (the packages are in .venv only)."""
    assert README.splitlines()[3].startswith("# Set up and run the main job")
    assert len(README.splitlines()) <= 200, "the README is the short way in: the rest belongs in docs/"
    for page, text in PAGES.items():
        bare = re.findall(r"(?<![\w/.\-])python3? (?:[\w/]+\.py|-m (?!venv)\w+)[^\n`]*", text)
        assert not bare, (page, bare)


def script_help(words: tuple[str, ...]) -> str:
    """The --help of a documented command (its subcommand's too, e.g. trainer.py sort)."""
    if words[0] == "./compile_ncs.sh":
        command, rest = ["bash", str(ROOT / "compile_ncs.sh")], words[1:]
    elif words[1] == "-m":
        command, rest = [sys.executable, "-m", words[2]], words[3:]
    else:
        command, rest = [sys.executable, str(ROOT / words[1])], words[2:]
    subcommand = list(rest[:1]) if rest and re.fullmatch(r"[a-z]+", rest[0]) else []
    done = subprocess.run(command + subcommand + ["--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, (words, done.stderr[-2000:])
    return done.stdout


def test_every_command_in_readme_and_docs_names_a_script_and_options_that_exist():
    """Each `.venv/bin/python ...` / `./compile_ncs.sh ...` of README.md and docs/*.md: the script (or
    module) exists and takes every --option the docs give it (read from its --help)."""
    commands = {tuple(match.split()) for text in PAGES.values() for match in COMMAND.findall(text)}
    assert len(commands) > 20, commands
    helps: dict = {}
    for words in sorted(commands):
        if words[:3] == (".venv/bin/python", "-m", "pytest"):
            continue  # pytest's own options
        if words[0] == ".venv/bin/python" and words[1] != "-m":
            assert (ROOT / words[1]).is_file(), f"{' '.join(words)}: no such script"
        key = words[:4]
        helps.setdefault(key, script_help(words))
        for option in (w.split("=")[0] for w in words if w.startswith("--")):
            assert option in helps[key], f"{' '.join(words)}: {option} is not an option of it"


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory):
    """A clone of the committed project beside the shared venv, a synthetic dataset and a tiny
    SavedModel trunk standing in for Inception V3 (150 px, the default size)."""
    from tests.synthetic import make_dataset, tiny_trunk

    if not (ROOT / ".git").exists() or not (ROOT / ".venv").exists():
        pytest.skip("needs the project's git checkout and its .venv (the README's set-up line)")
    tmp = tmp_path_factory.mktemp("newcomer")
    clone = tmp / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    make_dataset(tmp / "data", patients=10, per_class=8)
    tiny_trunk(150).export(str(tmp / "trunk"), verbose=False)
    return clone, tmp


def run(clone, command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTEST", "VIRTUAL_ENV"))}
    done = subprocess.run(command, shell=True, cwd=clone, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_the_readme_pipeline_in_a_fresh_clone(fresh_clone):
    clone, tmp = fresh_clone
    # The main command, with this test's data and trunk in place of ../shared's.
    main = run(clone, f".venv/bin/python trainer.py all --data {tmp / 'data'} --weights {tmp / 'trunk'}")
    assert "Final Streaming Accuracy" in main.stdout and (clone / "model" / "model.json").exists()
    # Later steps as the README writes them: no flags repeated.
    again = run(clone, ".venv/bin/python trainer.py train")
    assert f"using --data {tmp / 'data'} from the previous run" in again.stderr
    assert f"using --weights {tmp / 'trunk'} from the previous run" in again.stderr
    assert "Evaluated 32 patches" in run(clone, ".venv/bin/python evaluate.py").stdout
    compiled = run(clone, "./compile_ncs.sh")
    assert "FP16: agreement" in compiled.stdout and "TASS Identified" in compiled.stdout
    assert "Tested 2 images" in run(clone, ".venv/bin/python inception_test.py").stdout
    assert "Evaluating openvino-FP16" in run(clone, ".venv/bin/python evaluate.py --precision FP16").stdout
    shutil.rmtree(clone / "model" / "bottlenecks")
