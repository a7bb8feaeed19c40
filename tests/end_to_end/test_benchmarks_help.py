"""benchmarks/*.py --help (and bad options), run as subprocesses: the benchmarks themselves are not run."""

import ast
import os
import re
import subprocess
import sys

import pytest

from tests.paths import ROOT

SCRIPTS = ("training.py", "inference.py", "server_load.py", "ablation.py", "cluster.py", "slide_parity.py")


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


def test_the_context_benchmark_judges_each_rule_on_folds_it_was_not_chosen_on(tmp_path):
    import csv

    import numpy as np

    done = run_script("context.py", "--help")
    assert done.returncode == 0 and "out-of-fold" in done.stdout, done.stderr
    rng = np.random.default_rng(0)
    for fold in range(1, 4):  # three folds of four 10x10 slides, IDC in each slide's left half, noisy P(IDC)
        folder = tmp_path / "tta" / f"fold-{fold}" / "reports" / "validation"
        folder.mkdir(parents=True)
        with (folder / "predictions.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["patient", "x", "y", "label", "p_idc"])
            for patient in range(4):
                for row in range(10):
                    for column in range(10):
                        label = int(column < 5)
                        p = float(np.clip(0.5 + (label - 0.5) * 0.3 + rng.normal(0, 0.25), 0, 1))
                        writer.writerow([f"{fold}-{patient}", 50 * column, 50 * row, label, round(p, 6)])
    done = run_script("context.py", tmp_path / "tta")
    assert done.returncode == 0, done.stderr
    means = {line.split()[0]: float(line.split()[1]) for line in done.stdout.splitlines()
             if line.split() and line.split()[0] in ("patch_alone", "weighted", "learned")}
    assert means["weighted"] > means["patch_alone"] + 0.05 and means["learned"] > means["patch_alone"] + 0.05, done.stdout
    assert run_script("context.py", tmp_path / "nothing").returncode != 0


def test_the_ensemble_weight_benchmark_recovers_the_patch_cnn_and_finds_the_mix_beats_either_part(tmp_path):
    import csv
    import json

    import numpy as np

    rng = np.random.default_rng(0)

    def noisy(label):  # P(IDC) with noise of its own: two of them average into a better one
        return np.clip(0.5 + (label - 0.5) * 0.3 + rng.normal(0, 0.25, label.shape), 0, 1).round(6)

    columns = np.tile(np.arange(10), 10)
    labels = (columns < 5).astype(int)
    for fold in range(1, 4):
        head_p, cnn_p = ({patient: noisy(labels) for patient in range(4)} for _ in range(2))
        for variant, p, bundle in (("head", head_p, {"patch_cnn": False}),
                                   ("model", {k: (head_p[k] + cnn_p[k]) / 2 for k in head_p}, {"patch_cnn": True}),
                                   ("other_head", {k: 1 - v for k, v in head_p.items()}, {"patch_cnn": False})):
            folder = tmp_path / variant / f"fold-{fold}"
            (folder / "reports" / "validation").mkdir(parents=True)
            (folder / "model.json").write_text(json.dumps(bundle))  # a bundle from before the share: 0.5
            with (folder / "reports" / "validation" / "predictions.csv").open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["patient", "x", "y", "label", "p_idc"])
                for patient in range(4):
                    for i in range(100):
                        writer.writerow([f"{fold}-{patient}", 50 * columns[i], 50 * (i // 10), labels[i],
                                         round(float(p[patient][i]), 6)])
    done = run_script("ensemble_weight.py", tmp_path / "model", tmp_path / "head", "--weights", "0", "0.5", "1")
    assert done.returncode == 0, done.stderr
    auc = {float(line.split()[0]): float(line.split()[1]) for line in done.stdout.splitlines()
           if re.match(r"\s+[01]\.\d\d ", line)}
    assert auc[0.5] > max(auc[0.0], auc[1.0]) + 0.02, done.stdout
    assert "the share chosen on the other folds" in done.stdout
    mismatched = run_script("ensemble_weight.py", tmp_path / "model", tmp_path / "other_head")
    assert mismatched.returncode != 0 and "is not the one in" in mismatched.stderr


def test_the_threshold_headroom_benchmark_finds_the_threshold_the_model_did_not_choose(tmp_path):
    import csv
    import json

    rows = [(0, 0.1), (0, 0.3), (0, 0.35), (1, 0.4), (1, 0.45), (1, 0.8)]  # (label, P(IDC))
    with (tmp_path / "predictions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "patient", "x", "y", "label", "p_idc"])
        writer.writerows([f"{k}.png", "a", 50 * k, 0, label, p] for k, (label, p) in enumerate(rows))
    (tmp_path / "metrics.json").write_text(json.dumps({"threshold": 0.6, "slide_context": None}))
    done = run_script("threshold_headroom.py", tmp_path)
    assert done.returncode == 0, done.stderr
    # at 0.6 one IDC patch of three is found (0.6667); at 0.36-0.40 every patch is right (1.0)
    assert "balanced accuracy 0.6667 (F1 0.5000) at the chosen threshold 0.6; at most 1.0000" in done.stdout, done.stdout


def test_the_stain_misses_benchmark_sees_specificity_fall_with_the_benign_tissues_haematoxylin(tmp_path):
    import csv

    import numpy as np
    from PIL import Image

    pink, purple = np.array((230, 150, 190)), np.array((120, 60, 160))
    for fold in (1, 2):
        folder = tmp_path / "tta_jpeg" / f"fold-{fold}" / "reports" / "validation"
        folder.mkdir(parents=True)
        predictions, patients = [], []
        for k in range(4):  # each patient's benign tissue darker than the last, and more often called IDC
            patient, share = f"{fold}{k}", (4 * (fold - 1) + k) / 7
            for n in range(6):
                label = int(n >= 4)
                colour = pink + (purple - pink) * (share if label == 0 else 1.0)
                rng = np.random.default_rng(n)
                path = folder / f"{patient}_{n}.png"
                Image.fromarray(np.clip(colour + rng.normal(0, 5, (50, 50, 3)), 0, 255).astype(np.uint8)).save(path)
                predictions.append([path, patient, 50 * n, 0, label])
            patients.append([patient, 1.0 - 0.5 * share, 0.8 + 0.1 * share, 0.01, 0.02, 0.7, 1.0])
        with (folder / "predictions.csv").open("w", newline="") as f:
            csv.writer(f).writerows([["file", "patient", "x", "y", "label"], *predictions])
        with (folder / "per_patient.csv").open("w", newline="") as f:
            csv.writer(f).writerows([["patient", "specificity", "sensitivity", "haematoxylin", "eosin", "brightness",
                                      "stain_distance"], *patients])
    done = run_script("stain_misses.py", tmp_path / "tta_jpeg")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("8 patients, out of fold (2 folds"), done.stdout
    specificity = done.stdout.split("sensitivity against")[0]
    assert re.search(r"benign haematoxylin\s+-1\.000", specificity), done.stdout
    assert run_script("stain_misses.py", tmp_path / "nothing").returncode != 0


def test_the_ablation_row_called_the_default_is_what_confs_json_trains():
    import json

    code = ("import json, sys; sys.path.insert(0, 'benchmarks'); import ablation; "
            "print(json.dumps([ablation.DEFAULT, ablation.VARIANTS['jpeg_mlp_cnn0.25'][0]]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    default, description = json.loads(done.stdout.splitlines()[-1])
    shipped = json.loads((ROOT / "confs.json").read_text())["ClassifierSettings"]
    assert description.endswith("the default")
    assert {key: shipped[key] for key in default} == default
