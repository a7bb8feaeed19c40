import csv
import errno
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idc.core.bundle import SPLITS, ModelDir
from idc.training import data
from idc.core.errors import DatasetError, ImageError
from idc.core.preprocessing import decode_image, preprocess
from tests.synthetic import make_dataset


def test_parse_patch_name():
    patch = data.parse_patch_name(Path("a/10253/1/10253_idx5_x1001_y751_class1.png"))
    assert (patch.patient, patch.x, patch.y, patch.label) == ("10253", 1001, 751, 1)
    assert data.parse_patch_name(Path("10253_idx5_x1_y2_class2.png")) is None
    assert data.parse_patch_name(Path("notes.png")) is None


def test_scan_missing_folder_explains_where_to_get_data(tmp_path):
    with pytest.raises(DatasetError, match="Breast Histopathology Images"):
        data.scan_dataset(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no IDC patches"):
        data.scan_dataset(tmp_path / "empty")


def test_patient_split_is_seeded_and_disjoint():
    patients = [str(i) for i in range(100)]
    a = data.patient_split(patients, 0.2, 0.1, seed=1)
    assert a == data.patient_split(patients, 0.2, 0.1, seed=1)
    assert a != data.patient_split(patients, 0.2, 0.1, seed=2)
    counts = {s: sum(v == s for v in a.values()) for s in SPLITS}
    assert counts == {"train": 70, "validation": 20, "test": 10}


@pytest.mark.parametrize("flat", [False, True])
def test_sort_never_leaks_a_patient(tmp_path, flat):
    make_dataset(tmp_path / "raw", patients=12, per_class=5, flat=flat)
    report = data.sort_dataset(tmp_path / "raw", ModelDir(tmp_path / "model", "m"), validation_fraction=0.25,
                               test_fraction=0.25, seed=3)
    by_split = {s: {p.patient for p in ModelDir(tmp_path / "model", "m").read_manifest(s)} for s in SPLITS}
    assert all(by_split.values())
    assert not (by_split["train"] & by_split["validation"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["validation"] & by_split["test"])
    assert sum(report.patients.values()) == 12
    assert sum(c[0] + c[1] for c in report.counts.values()) == 12 * 10
    # the training layout: class folders named by integers, files copied
    assert len(list((tmp_path / "model" / "train" / "1").glob("*.png"))) == report.counts["train"][1]
    # the example images come from TEST patients and have the right class
    for name, label in (("positive.png", 1), ("negative.png", 0)):
        example = tmp_path / "model" / "test" / name
        twins = [p for p in ModelDir(tmp_path / "model", "m").read_manifest("test")
                 if p.path.read_bytes() == example.read_bytes()]
        assert twins and twins[0].label == label


def test_corrupt_images_are_skipped_counted_and_listed(tmp_path):
    raw = make_dataset(tmp_path / "raw", patients=4, per_class=3)
    bad = raw / "9000" / "1" / "9000_idx5_x999_y999_class1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    empty = raw / "9001" / "0" / "9001_idx5_x998_y998_class0.png"
    empty.write_bytes(b"")
    report = data.sort_dataset(raw, ModelDir(tmp_path / "model", "m"), validation_fraction=0.25, test_fraction=0.25, seed=0)
    assert sorted(name for name, _ in report.skipped) == sorted([str(bad), str(empty)])
    assert sum(c[0] + c[1] for c in report.counts.values()) == 4 * 6
    rows = list(csv.reader((tmp_path / "model" / "skipped.csv").open()))
    assert len(rows) == 3 and "skipped: 2 (2 unreadable or corrupt)" in report.table()


def _sort_odd(tmp_path, add):
    """Sort a small synthetic dataset after `add(raw)` drops odd files into it; the report and skipped.csv."""
    raw = make_dataset(tmp_path / "raw", patients=4, per_class=3)
    add(raw)
    report = data.sort_dataset(raw, ModelDir(tmp_path / "model", "m"), validation_fraction=0.25,
                               test_fraction=0.25, seed=0)
    skipped_csv = (tmp_path / "model" / "skipped.csv").read_bytes()
    assert b"\r" not in skipped_csv
    rows = list(csv.reader(skipped_csv.decode().splitlines()))
    assert rows[0] == ["file", "why"] and [tuple(r) for r in rows[1:]] == report.skipped
    return raw, report, dict(report.skipped)


def test_patch_in_a_folder_other_than_0_or_1_is_listed(tmp_path):
    def add(raw):
        (raw / "9000" / "2").mkdir()
        Image.new("RGB", (50, 50)).save(raw / "9000" / "2" / "9000_idx5_x900_y900_class1.png")
        Image.new("RGB", (50, 50)).save(raw / "9000" / "0" / "9000_idx5_x950_y950_class1.png")
    raw, report, why = _sort_odd(tmp_path, add)
    assert why[str(raw / "9000" / "2" / "9000_idx5_x900_y900_class1.png")] == \
        "in folder 2/, not a class folder 0/ or 1/"
    assert why[str(raw / "9000" / "0" / "9000_idx5_x950_y950_class1.png")] == "in class folder 0/ but named class1"
    assert sum(c[0] + c[1] for c in report.counts.values()) == 4 * 6


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own notice; the sort reports it
def test_huge_image_named_like_a_patch_is_skipped(tmp_path):
    huge = lambda raw: Image.new("RGB", (5000, 5000)).save(raw / "9001" / "1" / "9001_idx5_x0_y999_class1.png")
    raw, report, why = _sort_odd(tmp_path, huge)
    assert why == {str(raw / "9001" / "1" / "9001_idx5_x0_y999_class1.png"):
                   "5000x5000 px, far from the dataset's 50x50 patches"}
    assert "skipped: 1 (1 far larger than a patch)" in report.table()


def test_small_edge_patches_are_kept_and_counted(tmp_path):
    small = lambda raw: Image.new("RGB", (20, 30)).save(raw / "9002" / "0" / "9002_idx5_x999_y0_class0.png")
    raw, report, why = _sort_odd(tmp_path, small)
    assert not why and sum(c[0] + c[1] for c in report.counts.values()) == 4 * 6 + 1
    kept = {p.path.name for p in ModelDir(tmp_path / "model", "m").read_manifest()}
    assert "9002_idx5_x999_y0_class0.png" in kept
    # make_dataset writes one 50x32 edge patch per patient and class: 8, plus the 20x30 one
    assert report.small == 9 and "patches under 50 px on a side (edge patches, kept): 9" in report.table()


def test_corrupt_file_is_worded_for_a_dataset(tmp_path):
    bad = lambda raw: (raw / "9003" / "1" / "9003_idx5_x999_y9_class1.png").write_bytes(b"this is no image")
    raw, report, why = _sort_odd(tmp_path, bad)
    assert why == {str(raw / "9003" / "1" / "9003_idx5_x999_y9_class1.png"):
                   "unreadable: not a PNG, JPEG, BMP or TIFF image (corrupt or another format)"}
    assert "send" not in report.table()


def test_files_not_named_like_patches_are_listed(tmp_path):
    def add(raw):
        (raw / "notes.txt").write_text("x")
        (raw / "9000" / "1" / "9000_idx5_x1_y1_class2.png").write_bytes(b"")
        (raw / "9000" / ".DS_Store").write_bytes(b"")
    raw, report, why = _sort_odd(tmp_path, add)
    assert why == {str(raw / "notes.txt"): "not named like an IDC patch",
                   str(raw / "9000" / "1" / "9000_idx5_x1_y1_class2.png"): "not named like an IDC patch",
                   str(raw / "9000" / ".DS_Store"): "hidden or system file"}
    assert report.skipped[-1][0] == str(raw / "9000" / ".DS_Store")  # clutter listed last


def test_table_counts_every_reason(tmp_path):
    def add(raw):
        (raw / "readme.md").write_text("x")
        (raw / "9000" / "2").mkdir()
        Image.new("RGB", (50, 50)).save(raw / "9000" / "2" / "9000_idx5_x900_y900_class1.png")
        Image.new("RGB", (300, 300)).save(raw / "9001" / "0" / "9001_idx5_x900_y0_class0.png")
        (raw / "9002" / "0" / "9002_idx5_x900_y0_class0.png").write_bytes(b"")
    raw, report, why = _sort_odd(tmp_path, add)
    assert ("skipped: 4 (1 not named like an IDC patch, 1 in a class folder other than 0/1, "
            "1 far larger than a patch, 1 unreadable or corrupt)") in report.table()
    assert why[str(raw / "9002" / "0" / "9002_idx5_x900_y0_class0.png")] == "unreadable: empty file: no image data"


def test_balance_to_count_per_class(tmp_path):
    make_dataset(tmp_path / "raw", patients=10, per_class=6)
    report = data.sort_dataset(tmp_path / "raw", ModelDir(tmp_path / "model", "m"), validation_fraction=0.2,
                               test_fraction=0.2, seed=0, samples_per_class=10)
    assert report.counts["train"][0] == 10 and report.counts["train"][1] == 10
    assert report.counts["test"][0] == 12  # held-out splits are never balanced


def test_patients_file_maps_reference_splits(tmp_path, caplog):
    make_dataset(tmp_path / "raw", patients=11, per_class=2)
    listing = tmp_path / "patients.csv"
    rows = ["patient_id,reference_split"] + [f"{9000 + i},{'val' if i < 3 else 'train' if i < 8 else 'extra'}"
                                              for i in range(10)]  # patient 9010 is not listed
    listing.write_text("\n".join(rows) + "\n")
    patients = data.read_patients_file(listing, {"train": "train", "extra": "train", "val": "test"})
    data.sort_dataset(tmp_path / "raw", ModelDir(tmp_path / "model", "m"), validation_fraction=0.2, test_fraction=0.0,
                      seed=0, patients_file=patients)
    test = {p.patient for p in ModelDir(tmp_path / "model", "m").read_manifest("test")}
    validation = {p.patient for p in ModelDir(tmp_path / "model", "m").read_manifest("validation")}
    assert test == {"9000", "9001", "9002"}
    assert len(validation) == 1 and not validation & test  # carved from train patients only
    assert "9010" not in {p.patient for p in ModelDir(tmp_path / "model", "m").read_manifest()}
    assert "1 patients are not in the patients file and are left out: 9010" in caplog.text
    with pytest.raises(DatasetError, match="does not map"):
        data.read_patients_file(listing, {"train": "train"})


def test_preprocess_pads_short_patches_and_scales():
    image = np.zeros((32, 50, 3), np.uint8)
    batch = preprocess(image, 75)
    assert batch.shape == (1, 75, 75, 3) and batch.dtype == np.float32
    assert batch.min() == -1.0 and batch.max() == 1.0  # black patch, white padding
    assert np.all(batch[0, -1] == 1.0)  # the padded bottom rows are white


def test_decode_rejects_non_images(tmp_path):
    for payload in (b"", b"hello", b"\x89PNG\r\n\x1a\n\x00\x00"):
        with pytest.raises(ImageError):
            decode_image(payload)
    from PIL import Image
    import io
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    with pytest.raises(ImageError, match="unsupported image format GIF"):
        decode_image(gif.getvalue())
    big = io.BytesIO()
    Image.new("RGB", (300, 10)).save(big, format="PNG")
    with pytest.raises(ImageError, match="limit is 100 px"):
        decode_image(big.getvalue(), max_side=100)


def _refusing_links(code: int):
    """os.link as on a file system that refuses it (EXDEV: another file system; EPERM: not permitted)."""
    def link(source, target, **kwargs):
        raise OSError(code, os.strerror(code))
    return link


def _sort_small(tmp_path):
    return data.sort_dataset(tmp_path / "raw", ModelDir(tmp_path / "model", "m"), validation_fraction=0.25,
                             test_fraction=0.25, seed=0)


def test_sort_hard_links_on_one_file_system_and_sorts_again(tmp_path):
    make_dataset(tmp_path / "raw", patients=4, per_class=3)
    for attempt in ("first", "again"):  # a re-sort replaces the links: still one extra name per dataset file
        report = _sort_small(tmp_path)
        rows = list(csv.DictReader((tmp_path / "model" / "manifest.csv").open()))
        assert len(rows) == 4 * 6 and report.linked == 4 * 6 and report.copied == 0, attempt
        for row in rows:
            sorted_file, source = os.stat(tmp_path / "model" / row["file"]), os.stat(row["source"])
            assert (sorted_file.st_ino, sorted_file.st_dev) == (source.st_ino, source.st_dev)
            assert sorted_file.st_nlink == 2, attempt
        assert "sorted files: 24 hard links to the dataset's files, 0 copies" in report.table().splitlines()
    # the published examples are copies: serving or editing them never touches the dataset
    assert os.stat(tmp_path / "model" / "test" / "positive.png").st_nlink == 1


def test_sort_copies_where_hard_links_are_refused(tmp_path, monkeypatch):
    make_dataset(tmp_path / "raw", patients=4, per_class=3)
    monkeypatch.setattr(os, "link", _refusing_links(errno.EXDEV))  # the model directory on another file system
    for attempt in ("first", "again"):
        report = _sort_small(tmp_path)
        assert report.linked == 0 and report.copied == 4 * 6, attempt
        for patch in ModelDir(tmp_path / "model", "m").read_manifest():
            assert patch.path.stat().st_nlink == 1
        source = next((tmp_path / "raw").rglob("*.png"))
        assert source.stat().st_nlink == 1
    assert ("sorted files: 0 hard links to the dataset's files, 24 copies "
            f"(hard link refused: {os.strerror(errno.EXDEV)})") in report.table()


@pytest.mark.parametrize("refuse_links", [False, True])
def test_placing_a_patch_replaces_an_existing_file_and_never_writes_through_it(tmp_path, monkeypatch,
                                                                               refuse_links):
    """A sorted file may be a hard link to a dataset file: placing another patch at its name must replace
    the name, not write into the shared bytes."""
    (tmp_path / "a.png").write_bytes(b"patch a")
    (tmp_path / "b.png").write_bytes(b"patch b")
    target = tmp_path / "sorted.png"
    os.link(tmp_path / "b.png", target)
    if refuse_links:
        monkeypatch.setattr(os, "link", _refusing_links(errno.EPERM))
    refused = data._link_or_copy(tmp_path / "a.png", target)
    assert (refused is None) != refuse_links
    assert target.read_bytes() == b"patch a" and (tmp_path / "b.png").read_bytes() == b"patch b"
