"""Each patient's staining beside their results (idc.training.stain) and in the evaluation report."""

import json

import numpy as np

from idc.core.bundle import Patch
from idc.training import stain
from idc.training.evaluation import evaluate

PURPLE, PINK, GLASS = (120, 60, 160), (230, 150, 190), (245, 245, 245)


def image(colour, glass_share=0.0, size=50, noise=6, seed=0):
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour, float) + rng.normal(0, noise, (size, size, 3)), 0, 255)
    pixels[: int(round(glass_share * size))] = GLASS  # the top rows are glass
    return pixels.astype(np.uint8)


def test_only_tissue_counts_and_haematoxylin_tells_purple_from_pink():
    sums, count = stain.tissue_sums(image(PURPLE, glass_share=0.5))
    assert count == 25 * 50  # the glass half is left out
    purple = sums / count
    sums, count = stain.tissue_sums(image(PINK))
    pink = sums / count
    assert purple[0] > 2 * pink[0]  # haematoxylin (nuclei) is purple
    assert purple[2] < pink[2]  # darker
    assert stain.tissue_sums(image(PINK, glass_share=1.0))[1] == 0
    glass_only = stain.PatientStain()  # a patch of glass alone gives its patient no staining
    glass_only.add("a", image(PINK, glass_share=1.0))
    assert glass_only.means() == {}


def patches_on_disk(tmp_path, colours):
    """{patient: colour} -> Patches of 6 PNGs each, slightly different."""
    from PIL import Image

    patches = []
    for patient, colour in colours.items():
        for k in range(6):
            path = tmp_path / f"{patient}_idx5_x{50 * k}_y0_class0.png"
            Image.fromarray(image(colour, seed=k)).save(path)
            patches.append(Patch(path, patient, 50 * k, 0, 0))
    return patches


def test_a_patient_stained_unlike_training_is_far_and_the_report_says_how_results_follow(tmp_path):
    rng = np.random.default_rng(3)
    training = {f"t{i}": tuple(int(c) for c in np.array(PURPLE) + rng.integers(-12, 13, 3)) for i in range(8)}
    ref = stain.reference(patches_on_disk(tmp_path, training), per_patient=4)
    assert ref["patients"] == 8 and len(ref["mean"]) == len(ref["std"]) == 3
    evaluated = stain.PatientStain()
    for patient, colour in (("typical", PURPLE), ("pale", PINK), ("near", (125, 65, 150))):
        evaluated.add(patient, image(colour))
    rows = [{"patient": "typical", "patches": 10, "specificity": 0.95, "sensitivity": 0.9},
            {"patient": "pale", "patches": 10, "specificity": 0.40, "sensitivity": 0.95},
            {"patient": "near", "patches": 10, "specificity": 0.9, "sensitivity": 0.85},
            {"patient": "unread", "patches": 10, "specificity": 1.0, "sensitivity": None}]
    summary = stain.annotate(rows, evaluated, ref)
    distance = {r["patient"]: r["stain_distance"] for r in rows}
    assert distance["pale"] > 3 * max(distance["typical"], distance["near"]) and distance["unread"] is None
    assert summary["furthest"][0]["patient"] == "pale"
    assert summary["spearman_distance_vs_specificity"]["patients"] == 3  # too few for a rho
    assert summary["spearman_haematoxylin_vs_specificity"]["patients"] == 3
    many = [{"patient": f"p{i}", "patches": 10, "specificity": 1.0 - 0.1 * i, "sensitivity": 0.5 + 0.05 * i} for i in range(6)]
    darker = stain.PatientStain()
    for i in range(6):  # each patient's tissue a little more purple (haematoxylin) than the last
        darker.add(f"p{i}", image(tuple(np.array(PINK) + (np.array(PURPLE) - PINK) * i / 5)))
    ranked = stain.annotate(many, darker, ref)
    assert ranked["spearman_haematoxylin_vs_specificity"]["rho"] == -1.0
    assert "vs haematoxylin -1.000" in stain.summary_lines(ranked)[1]
    lines = stain.summary_lines(summary)
    assert lines[0].startswith("Staining (against 8 training patients") and "furthest: patient pale" in lines[-3]
    assert stain.plot(tmp_path, rows).stat().st_size > 0


def test_no_reference_from_fewer_than_three_patients(tmp_path):
    assert stain.reference(patches_on_disk(tmp_path, {"a": PURPLE, "b": PINK})) is None
    rows = [{"patient": "a", "patches": 6, "specificity": 1.0, "sensitivity": None}]
    evaluated = stain.PatientStain()
    evaluated.add("a", image(PURPLE))
    assert stain.annotate(rows, evaluated, None) == {"reference": None}
    assert "stain_distance" not in rows[0] and rows[0]["haematoxylin"] > 0 and stain.summary_lines({"reference": None}) == []


def test_the_evaluation_report_gives_each_patients_staining(tiny_project, tmp_path):
    config, _ = tiny_project
    result = evaluate(config, split="test", report_dir=tmp_path / "report", echo=lambda *a: None)
    assert result["staining"]["reference"]["patients"] == 6  # the tiny project's training patients
    header, *rows = (tmp_path / "report" / "per_patient.csv").read_text().splitlines()
    assert header.split(",")[-4:] == ["haematoxylin", "eosin", "brightness", "stain_distance"]
    assert len(rows) == result["patients"] and all(row.split(",")[-1] for row in rows)
    assert "stain.png" in (tmp_path / "report" / "index.html").read_text()
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["staining"]["furthest"]
