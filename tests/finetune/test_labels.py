"""Bad labels give a clear error naming the file (and line); good ones load aligned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ft_phantoms import phantom_volume, save_nifti, write_seg_set

from fed_unimiss.finetune.config import FinetuneConfig
from fed_unimiss.finetune.label_tables import read_label_csv
from fed_unimiss.finetune.labels import LabelError, read_label_map
from fed_unimiss.finetune.tasks import find_seg_pairs, load_seg_cases

CFG = FinetuneConfig(task="seg3d", patch_3d=(8, 48, 48), size_2d=48, ct_spacing=None)


def _case(tmp_path: Path, labels: np.ndarray | None = None, shape=(8, 48, 48)) -> Path:
    hu, lab = phantom_volume(np.random.default_rng(0), shape)
    save_nifti(hu, tmp_path / "ct.nii.gz")
    save_nifti(lab if labels is None else labels, tmp_path / "ct_label.nii.gz", dtype=np.float32)
    return tmp_path


def test_shape_mismatch_names_the_label_file(tmp_path):
    _case(tmp_path, labels=np.zeros((8, 48, 40), np.uint8))
    with pytest.raises(LabelError, match=r"ct_label\.nii\.gz.*shape \(8, 48, 40\).*\(8, 48, 48\)"):
        load_seg_cases(tmp_path, CFG, num_classes=3)


def test_label_outside_class_range_names_the_file(tmp_path):
    labels = np.zeros((8, 48, 48), np.uint8)
    labels[2, 10, 10] = 5
    _case(tmp_path, labels=labels)
    with pytest.raises(LabelError, match=r"ct_label\.nii\.gz: label 5 is outside the class range 0\.\.2"):
        load_seg_cases(tmp_path, CFG, num_classes=3)


def test_negative_and_non_integer_labels_are_refused(tmp_path):
    labels = np.zeros((8, 48, 48), np.float32)
    labels[0, 0, 0] = -1
    _case(tmp_path, labels=labels)
    with pytest.raises(LabelError, match=r"ct_label\.nii\.gz: negative label -1"):
        load_seg_cases(tmp_path, CFG, num_classes=None)
    labels[0, 0, 0] = 0.5
    save_nifti(labels, tmp_path / "ct_label.nii.gz")
    with pytest.raises(LabelError, match=r"ct_label\.nii\.gz: label map holds non-integer"):
        read_label_map(tmp_path / "ct_label.nii.gz")


def test_label_map_is_resampled_by_nearest_neighbour_with_its_image(tmp_path):
    write_seg_set(tmp_path, 1, seed=5, shape=(8, 48, 48))
    cfg = FinetuneConfig(task="seg3d", ct_spacing=(3.0, 1.5, 1.5))
    (case,) = load_seg_cases(tmp_path, cfg, num_classes=3)
    assert case.image.shape == case.labels.shape == (8, 32, 32)
    assert set(np.unique(case.labels)) <= {0, 1, 2}  # no blended classes
    assert case.labels.dtype == np.int64
    # The bright organ (class 1) stays bright in the resampled image.
    assert case.image[case.labels == 1].mean() > case.image[case.labels == 0].mean() + 0.1


def test_seg2d_on_ct_pairs_gives_one_case_per_slice(tmp_path):
    write_seg_set(tmp_path, 2, seed=6, shape=(8, 48, 48))
    cfg = FinetuneConfig(task="seg2d", ct_spacing=None)
    cases = load_seg_cases(tmp_path, cfg, num_classes=3)
    assert len(cases) == 16 and cases[0].image.shape == (48, 48)
    assert len(load_seg_cases(tmp_path, cfg, num_classes=3, fraction=0.5)) == 8  # one volume


def test_images_without_label_maps_are_skipped_and_none_is_an_error(tmp_path):
    write_seg_set(tmp_path, 1, seed=7, shape=(8, 48, 48))
    save_nifti(np.zeros((8, 48, 48), np.float32), tmp_path / "unlabelled.nii.gz")
    assert [p.name for p, _ in find_seg_pairs(tmp_path)] == ["case00.nii.gz"]
    empty = tmp_path / "empty"
    empty.mkdir()
    save_nifti(np.zeros((8, 48, 48), np.float32), empty / "a.nii.gz")
    with pytest.raises(LabelError, match="no image with a label map"):
        find_seg_pairs(empty)


@pytest.mark.parametrize("body,match", [
    ("name,label\nx.png,1\n", "first line must be the header 'file,label'"),
    ("file,label\nx.png,one\n", r"labels\.csv:2: label 'one' is not an integer"),
    ("file,label\nx.png,7\n", r"labels\.csv:2: label 7 is outside the class range 0\.\.1"),
    ("file,label\nmissing.png,1\n", r"labels\.csv:2: missing\.png does not exist"),
    ("file,label\nx.png,1\nx.png,0\n", r"labels\.csv:3: x\.png is listed twice"),
])
def test_label_csv_errors_name_file_and_line(tmp_path, body, match):
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "labels.csv").write_text(body)
    with pytest.raises(LabelError, match=match):
        read_label_csv(tmp_path / "labels.csv", num_classes=2)
