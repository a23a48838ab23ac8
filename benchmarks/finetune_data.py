"""Labelled 3D segmentation sets for the fine-tuning benchmarks, written as real NIfTI files.

Two sets, each a ``train/`` and a ``val/`` folder in the layout ``fed-unimiss finetune`` reads
(``NAME.nii.gz`` + ``NAME_label.nii.gz``):

- ``phantom``: procedural torso CT with organ labels (lung, liver, kidney, bone, lesion) from
  ``fed-unimiss data phantom --labels``; train and val from different seeds ("patients").
- ``brain``: real anatomy. Debian's ``mricron-data`` ships the Colin27 "ch2" T1 MR head and the
  AAL atlas (116 regions drawn by anatomists) on the same 1 mm grid. The regions are grouped
  into seven lobes (frontal, insula + limbic, occipital, parietal, deep grey nuclei, temporal,
  cerebellum + vermis) by the first digit of AAL's region code. Training is the left
  hemisphere, cut into four axial slabs (so 25 % of the labels is one slab); validation is the
  right hemisphere, mirrored: the same lobes, voxels the model never trained on.

The brain set needs the package file: ``apt-get download mricron-data`` (done here when apt is
available), never a download at fine-tuning time.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]

# First digit of the AAL code -> lobe class (0 stays background).
AAL_LOBES = {2: 1, 3: 2, 4: 2, 5: 3, 6: 4, 7: 5, 8: 6, 9: 7}
LOBE_NAMES = ["frontal", "insula+limbic", "occipital", "parietal", "deep grey", "temporal",
              "cerebellum"]


def _save(array_xyz: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0), dtype=np.float32) -> None:
    nib.save(nib.Nifti1Image(array_xyz.astype(dtype), np.diag([*spacing, 1.0])), str(path))


def mricron_templates(cache: Path) -> Path:
    """The folder holding ch2.nii.gz and aal.nii.gz (+ aal.nii.txt), fetched once with apt."""
    folder = cache / "mricron" / "usr" / "share" / "mricron" / "templates"
    if (folder / "aal.nii.gz").exists():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "mricron-data"], cwd=tmp, check=True,
                       capture_output=True)
        deb = next(Path(tmp).glob("mricron-data_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(cache / "mricron")], check=True)
    return folder


def aal_lobes(templates: Path) -> np.ndarray:
    """The AAL atlas as a lobe label map (x, y, z), classes 0..7."""
    codes = {}
    for line in (templates / "aal.nii.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3:
            codes[int(parts[0])] = AAL_LOBES.get(int(parts[2]) // 1000, 0)
    aal = np.asarray(nib.load(str(templates / "aal.nii.gz")).dataobj).astype(np.int64)
    lut = np.zeros(aal.max() + 1, np.uint8)
    for region, lobe in codes.items():
        lut[region] = lobe
    return lut[aal]


def write_brain_set(out: Path, cache: Path) -> Path:
    """train/ (left hemisphere in 4 axial slabs) and val/ (right hemisphere, mirrored)."""
    if (out / ".done").exists():
        return out
    templates = mricron_templates(cache)
    mr = np.asarray(nib.load(str(templates / "ch2.nii.gz")).dataobj).astype(np.float32)
    lobes = aal_lobes(templates)
    mid = mr.shape[0] // 2  # x runs left to right in this RAS grid
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "val").mkdir(parents=True, exist_ok=True)
    left_mr, left_lab = mr[:mid], lobes[:mid]
    right_mr, right_lab = mr[mid:][::-1], lobes[mid:][::-1]
    bounds = np.linspace(0, mr.shape[2], 5).astype(int)  # four axial slabs
    for k, (z0, z1) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        _save(left_mr[:, :, z0:z1], out / "train" / f"slab{k}.nii.gz")
        _save(left_lab[:, :, z0:z1], out / "train" / f"slab{k}_label.nii.gz", dtype=np.uint8)
    _save(right_mr, out / "val" / "right.nii.gz")
    _save(right_lab, out / "val" / "right_label.nii.gz", dtype=np.uint8)
    (out / ".done").write_text("")
    return out


def write_phantom_set(out: Path, n_train: int, n_val: int, lateral: bool = False) -> Path:
    """Labelled phantom CT through the project's own ``data phantom`` command, laid out flat.

    ``lateral`` labels the kidneys by side (kidney_right 3, kidney_left 6).
    """
    if (out / ".done").exists():
        return out
    for split, n, seed in (("train", n_train, 201), ("val", n_val, 202)):
        raw = out / f"{split}-raw"
        subprocess.run([sys.executable, "-m", "fed_unimiss.cli.main", "data", "phantom",
                        str(raw), "--ct", str(n), "--xray", "0", "--labels", "--format", "nifti",
                        "--seed", str(seed), *(["--lateral"] if lateral else [])], check=True,
                       cwd=REPO, capture_output=True)
        (out / split).mkdir(parents=True, exist_ok=True)
        for image in sorted((raw / "nifti").glob("*.nii.gz")):
            image.rename(out / split / image.name)
            (raw / "labels" / "seg" / image.name).rename(
                out / split / image.name.replace(".nii.gz", "_label.nii.gz"))
    (out / ".done").write_text("")
    return out


# TotalSegmentator's classes of the abdominal task, in our class order (1..6).
ABDOMEN_CLASSES = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver", 6: "stomach",
                   52: "aorta"}
ABDOMEN_NAMES = list(ABDOMEN_CLASSES.values())


def write_abdomen_set(out: Path, source: Path) -> Path:
    """Real abdominal CT with lateral labels, cut into axial slabs: train and val interleave.

    ``source`` holds TotalSegmentator's public test files (github.com/wasserth/TotalSegmentator,
    ``tests/reference_files``, Apache-2.0): ``example_ct_sm.nii.gz``, a real abdominal CT at
    3 mm, and ``example_seg.nii.gz``, its multi-organ label map. Nothing is downloaded here. The
    six organs of the task are spleen, right and left kidney, liver, stomach and aorta: two of
    them are told apart only by side. The 30 slices become five 6-slice slabs; slabs 0, 2, 4
    train and 1, 3 validate, so both sides see every organ at a different level.
    """
    if (out / ".done").exists():
        return out
    ct_img = nib.load(str(source / "example_ct_sm.nii.gz"))
    seg_img = nib.load(str(source / "example_seg.nii.gz"))
    ct = np.asarray(ct_img.dataobj).astype(np.float32)
    raw = np.asarray(seg_img.dataobj).astype(np.int64)
    if ct.shape != raw.shape:
        raise SystemExit(f"{source}: CT {ct.shape} and labels {raw.shape} differ")
    lut = np.zeros(max(256, raw.max() + 1), np.uint8)
    for k, code in enumerate(ABDOMEN_CLASSES, start=1):
        lut[code] = k
    seg = lut[raw]
    # The voxel axis that runs along the patient's head-feet (world z) direction.
    axis = int(np.argmax(np.abs(ct_img.affine[2, :3])))
    bounds = np.linspace(0, ct.shape[axis], 6).astype(int)
    for k, (z0, z1) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        split = "train" if k % 2 == 0 else "val"
        (out / split).mkdir(parents=True, exist_ok=True)
        index = [slice(None)] * 3
        index[axis] = slice(z0, z1)
        shift = np.eye(4)
        shift[axis, 3] = z0
        affine = ct_img.affine @ shift
        nib.save(nib.Nifti1Image(ct[tuple(index)], affine), str(out / split / f"slab{k}.nii.gz"))
        nib.save(nib.Nifti1Image(seg[tuple(index)], affine),
                 str(out / split / f"slab{k}_label.nii.gz"))
    (out / ".done").write_text("")
    return out
