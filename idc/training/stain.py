"""Each patient's staining beside their results, so a reader can see whether stain explains the misses.

Per patient: the mean haematoxylin and eosin densities (colour deconvolution, scikit-image's
rgb2hed, in its units) and the mean brightness of the tissue pixels (saturation >= the slides'
MIN_SATURATION, so glass and fat do not count), and `stain_distance`: how far that is from the
training patients' staining, as the root mean square of its three z-scores against the training
patients' own per-patient means (about 1 for a typical training patient; 3 is three spreads away).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from idc.core.errors import ImageError
from idc.core.preprocessing import decode_image
from idc.slides.tissue import tissue_pixels

FIELDS = ("haematoxylin", "eosin", "brightness")
REFERENCE_PATCHES = 20  # per training patient: their staining, at a few seconds' cost


def tissue_sums(image: np.ndarray) -> tuple[np.ndarray, int]:
    """(sums of FIELDS over the image's tissue pixels, how many there are)."""
    from skimage.color import rgb2hed

    rgb = np.asarray(image)[..., :3]
    tissue = tissue_pixels(rgb)
    count = int(tissue.sum())
    if not count:
        return np.zeros(len(FIELDS)), 0
    hed = rgb2hed(rgb)[tissue]
    brightness = rgb.max(axis=2)[tissue] / 255.0  # HSV's V
    return np.array([hed[:, 0].sum(), hed[:, 1].sum(), brightness.sum()]), count


class PatientStain:
    """Accumulates the tissue statistics of each patient's patches (add them one by one)."""

    def __init__(self):
        self._sums, self._counts = defaultdict(lambda: np.zeros(len(FIELDS))), defaultdict(int)

    def add(self, patient: str, image: np.ndarray) -> None:
        sums, count = tissue_sums(image)
        self._sums[patient] += sums
        self._counts[patient] += count

    def means(self) -> dict[str, np.ndarray]:
        return {patient: self._sums[patient] / count for patient, count in self._counts.items() if count}


def reference(patches, per_patient: int = REFERENCE_PATCHES, seed: int = 42) -> dict | None:
    """The training patients' staining: mean and spread of their per-patient means, from up to
    `per_patient` patches of each (drawn with `seed`). None when fewer than 3 patients are readable."""
    by_patient = defaultdict(list)
    for patch in patches:
        by_patient[patch.patient].append(patch)
    rng = np.random.default_rng(seed)
    stain = PatientStain()
    for patient, items in sorted(by_patient.items()):
        for index in rng.permutation(len(items))[:per_patient]:
            try:
                stain.add(patient, decode_image(items[index].path))
            except ImageError:
                continue  # counted where the dataset is sorted; here a few patches fewer
    means = np.array(list(stain.means().values()))
    if len(means) < 3:
        return None
    return {"patients": len(means), "patches_per_patient": per_patient, "mean": means.mean(0).tolist(),
            "std": means.std(0, ddof=1).tolist()}


def annotate(rows: list[dict], stain: PatientStain, ref: dict | None) -> dict:
    """Add each patient's FIELDS (and stain_distance, with a reference) to their per-patient `rows`;
    returns how the distance goes with specificity and sensitivity across patients (Spearman)."""
    means = stain.means()
    distances = {}
    for row in rows:
        values = means.get(row["patient"])
        for name, value in zip(FIELDS, values if values is not None else [None] * len(FIELDS)):
            row[name] = None if value is None else round(float(value), 4)
        if ref is not None and values is not None:
            z = (values - np.array(ref["mean"])) / np.maximum(np.array(ref["std"]), 1e-9)
            distances[row["patient"]] = row["stain_distance"] = round(float(np.sqrt(np.mean(z ** 2))), 3)
        elif ref is not None:
            row["stain_distance"] = None
    summary = {"reference": ref}
    if ref is not None:
        for rate in ("specificity", "sensitivity"):
            pairs = [(distances[r["patient"]], r[rate]) for r in rows
                     if r.get(rate) is not None and r["patient"] in distances]
            summary[f"spearman_distance_vs_{rate}"] = _spearman(pairs)
            # The distance has no direction; each field has: over 201 patients' out-of-fold results,
            # specificity fell with haematoxylin density and not with the distance (docs/results.md).
            for field in FIELDS:
                summary[f"spearman_{field}_vs_{rate}"] = _spearman(
                    [(r[field], r[rate]) for r in rows if r.get(rate) is not None and r.get(field) is not None])
        furthest = sorted((r for r in rows if r["patient"] in distances), key=lambda r: -distances[r["patient"]])
        summary["furthest"] = [{key: r[key] for key in ("patient", "stain_distance", "specificity", "sensitivity")}
                               for r in furthest[:3]]
    return summary


def summary_lines(staining: dict) -> list[str]:
    """The console's lines on staining (evaluate.py): how results go with the stain distance."""
    if not staining or staining.get("reference") is None:
        return []
    ref = staining["reference"]
    lines = [f"Staining (against {ref['patients']} training patients; per_patient.csv and stain.png have every patient):"]
    for rate in ("specificity", "sensitivity"):
        corr = staining[f"spearman_distance_vs_{rate}"]
        if corr["rho"] is not None:
            fields = [(field, staining.get(f"spearman_{field}_vs_{rate}") or {}) for field in FIELDS]
            lines.append(f"  {rate:<12} vs stain distance: Spearman rho {corr['rho']:+.3f} (p {corr['p_value']:.3f}, "
                         f"{corr['patients']} patients); " + ", ".join(
                             f"vs {field} {c['rho']:+.3f} (p {c['p_value']:.3f})" for field, c in fields
                             if c.get("rho") is not None))
    rates = lambda r: ", ".join(f"{k} {r[k]:.3f}" for k in ("specificity", "sensitivity") if r[k] is not None)
    lines += [f"  furthest: patient {r['patient']} (distance {r['stain_distance']:.2f}: {rates(r)})"
              for r in staining["furthest"]]
    return lines


def _spearman(pairs: list[tuple[float, float]]) -> dict:
    if len(pairs) < 4:
        return {"rho": None, "p_value": None, "patients": len(pairs)}
    from scipy.stats import spearmanr

    result = spearmanr([a for a, _ in pairs], [b for _, b in pairs])
    rho, p_value = float(result.statistic), float(result.pvalue)
    return {"rho": None if np.isnan(rho) else round(rho, 3), "p_value": None if np.isnan(p_value) else round(p_value, 4),
            "patients": len(pairs)}


def plot(report_dir, rows: list[dict]):
    """stain.png: each patient's specificity and sensitivity against their stain distance; None without."""
    points = [r for r in rows if r.get("stain_distance") is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for rate, colour in (("specificity", "tab:blue"), ("sensitivity", "tab:red")):
        shown = [r for r in points if r.get(rate) is not None]
        ax.scatter([r["stain_distance"] for r in shown], [r[rate] for r in shown], s=[8 + r["patches"] / 10 for r in shown],
                   color=colour, alpha=0.6, label=rate)
    ax.set_xlabel("stain distance from the training patients (RMS z-score)")
    ax.set_ylabel("per patient")
    ax.set_title("Patients: staining against results (dot area: patches)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = report_dir / "stain.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
