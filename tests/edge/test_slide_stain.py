"""Per-slide stain normalisation (idc.slides.stain): a slide's tissue statistics, glass left out, and
a re-stained slide brought back to the target stain."""

from types import SimpleNamespace

import numpy as np
from PIL import Image

from idc.slides.stain import Stain, StainStatistics, from_lab, normalise, patient_stains, to_lab
from tests.slides import GLASS
from tests.synthetic import patch_image, restained


def slide_patches(seed: int = 0, count: int = 12) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.asarray(patch_image(i % 2, rng)) for i in range(count)]


def stain_of(images) -> Stain | None:
    statistics = StainStatistics()
    for image in images:
        statistics.add(image)
    return statistics.stain()


def test_lab_round_trip_keeps_the_pixels():
    rgb = np.random.default_rng(0).integers(1, 256, (64, 64, 3), dtype=np.uint8)
    assert to_lab(rgb).shape == rgb.shape
    assert np.abs(from_lab(to_lab(rgb)).astype(int) - rgb).max() <= 1


def test_a_restained_slide_comes_back_to_the_target_stain():
    original = slide_patches()
    target = stain_of(original)
    shifted = [restained(image) for image in original]
    source = stain_of(shifted)
    assert np.abs(np.subtract(source.mean, target.mean)).max() > 0.02  # the cast is really there
    back = [normalise(image, source, target) for image in shifted]
    assert all(b.dtype == np.uint8 and b.shape == o.shape for b, o in zip(back, original))
    # near, not exact: bright pixels clip at white, and the tissue mask follows the new colours
    np.testing.assert_allclose(stain_of(back).mean, target.mean, atol=0.02)
    np.testing.assert_allclose(stain_of(back).std, target.std, rtol=0.1)
    before = np.mean([np.abs(s.astype(int) - o).mean() for s, o in zip(shifted, original)])
    after = np.mean([np.abs(b.astype(int) - o).mean() for b, o in zip(back, original)])
    assert after < before / 3, (before, after)


def test_glass_does_not_count_and_a_slide_without_tissue_is_left_as_it_is():
    tissue = slide_patches()
    glass = [np.full((50, 50, 3), GLASS, np.uint8) for _ in range(30)]
    with_glass = stain_of(tissue + glass)
    np.testing.assert_allclose(with_glass.mean, stain_of(tissue).mean, atol=1e-9)
    np.testing.assert_allclose(with_glass.std, stain_of(tissue).std, atol=1e-9)
    assert stain_of(glass) is None  # nothing to measure: under MIN_TISSUE_PIXELS tissue pixels
    assert normalise(glass[0], None, with_glass) is glass[0]


def test_the_typical_stain_is_the_mean_of_the_slides_and_reads_from_a_bundle():
    a, b = Stain((1.0, 0.0, -1.0), (0.2, 0.1, 0.3)), Stain((3.0, 0.2, -0.5), (0.4, 0.1, 0.1))
    typical = Stain.typical([a, b])
    np.testing.assert_allclose(typical.mean, (2.0, 0.1, -0.75))
    np.testing.assert_allclose(typical.std, (0.3, 0.1, 0.2))
    bundle = {"method": "slide", "target_mean": list(typical.mean), "target_std": list(typical.std)}
    assert Stain.from_bundle(bundle) == typical
    assert Stain.from_bundle({"method": "reinhard", "target_mean": [0] * 3, "target_std": [1] * 3}) is None
    assert Stain.from_bundle(None) is None


def test_patient_stains_pool_each_patients_patches_and_skip_unreadable_files(tmp_path):
    patches = []
    for patient, images in (("p1", slide_patches(1)), ("p2", [restained(i) for i in slide_patches(2)])):
        for k, image in enumerate(images):
            path = tmp_path / f"{patient}_{k}.png"
            Image.fromarray(image).save(path)
            patches.append(SimpleNamespace(patient=patient, path=path))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    patches.append(SimpleNamespace(patient="p1", path=tmp_path / "broken.png"))
    glass = tmp_path / "glass.png"
    Image.new("RGB", (50, 50), GLASS).save(glass)
    patches.append(SimpleNamespace(patient="p3", path=glass))
    stains = patient_stains(patches)
    assert set(stains) == {"p1", "p2", "p3"} and stains["p3"] is None
    np.testing.assert_allclose(stains["p1"].mean, stain_of(slide_patches(1)).mean, atol=1e-9)
    assert np.abs(np.subtract(stains["p1"].mean, stains["p2"].mean)).max() > 0.02
