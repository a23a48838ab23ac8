"""Bad input at a site: every case is rejected with a reason naming what is wrong, never fatal."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from fed_unimiss.data.scan import scan


def _series(phantom_site: Path) -> list[Path]:
    return sorted((phantom_site / "ct" / "case-0000").glob("*.dcm"))


def _reasons(report) -> dict[str, str]:
    return {Path(r.path).name: r.reason for r in report.rejected}


def test_damaged_files_are_each_rejected_with_a_reason(tmp_path, phantom_site):
    good = phantom_site / "xray" / "xray-0001.png"
    shutil.copy(good, tmp_path / "good.png")
    data = _series(phantom_site)[0].read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (tmp_path / "notdicom.dcm").write_text("this is a text file, not DICOM\n" * 20)
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello")
    os.mkfifo(tmp_path / "fifo.dcm")
    flat = nib.Nifti1Image(np.ones((64, 64), np.float32), np.eye(4))
    nib.save(flat, tmp_path / "flat.nii.gz")
    vol = np.zeros((16, 16, 16), np.float32)
    vol[3, 4, 5], vol[7, 7, 7] = np.nan, np.inf
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "nan.nii.gz")
    shutil.copy(_series(phantom_site)[5], tmp_path / "single-slice.dcm")

    report = scan(tmp_path)

    assert [u.name for u in report.usable] == ["good.png"]  # relative to the scanned folder
    reasons = _reasons(report)
    assert "truncated pixel data" in reasons["truncated.dcm"] or \
        "damaged" in reasons["truncated.dcm"]
    assert "not a DICOM file" in reasons["notdicom.dcm"]
    assert reasons["empty.dcm"] == "empty file (0 bytes)"
    assert "not an image file" in reasons["notes.txt"]
    assert "not a regular file" in reasons["fifo.dcm"]
    assert "2D image where a volume is expected" in reasons["flat.nii.gz"]
    assert "2 voxel(s) are NaN or infinite" in reasons["nan.nii.gz"]
    assert "single 2D slice where a volume is expected" in reasons[tmp_path.name]


def test_two_series_in_one_folder_are_read_separately_and_reported(tmp_path, phantom_site):
    from fed_unimiss.data.phantom import write_phantoms

    other = tmp_path / "other"
    write_phantoms(other, 1, 0, seed=99, fmt="dicom")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, p in enumerate(_series(phantom_site)):
        shutil.copy(p, mixed / f"a{i:03d}.dcm")
    for i, p in enumerate(sorted((other / "ct" / "case-0000").glob("*.dcm"))):
        shutil.copy(p, mixed / f"b{i:03d}.dcm")
    report = scan(mixed)
    assert report.rejected == []
    assert len(report.usable) == 2
    assert all("folder holds 2 series" in u.notes[0] for u in report.usable)


def test_missing_and_uneven_slices_are_detected(tmp_path, phantom_site):
    gap = tmp_path / "gap"
    gap.mkdir()
    files = _series(phantom_site)
    for p in files[:10] + files[11:]:
        shutil.copy(p, gap / p.name)
    uneven = tmp_path / "uneven"
    uneven.mkdir()
    for p in files:
        shutil.copy(p, uneven / p.name)
    ds = pydicom.dcmread(uneven / files[20].name)
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 1.2  # off-grid slice
    ds.save_as(uneven / files[20].name)
    reasons = _reasons(scan(tmp_path))
    assert "1 slice(s) missing" in reasons["gap"]
    assert "after slice 10" in reasons["gap"]
    assert "unevenly spaced slices" in reasons["uneven"]


def test_mixed_sizes_in_one_series(tmp_path, phantom_site):
    for p in _series(phantom_site):
        shutil.copy(p, tmp_path / p.name)
    ds = pydicom.dcmread(tmp_path / "IM-0003.dcm")
    ds.PixelData = np.zeros((64, 64), np.uint16).tobytes()
    ds.Rows = ds.Columns = 64
    ds.save_as(tmp_path / "IM-0003.dcm")
    (rejection,) = scan(tmp_path).rejected
    assert "slices of different sizes in one series" in rejection.reason
    assert "64x64 (1 files)" in rejection.reason


def test_symlink_loops_are_reported_not_followed_forever(tmp_path, phantom_site):
    shutil.copy(phantom_site / "xray" / "xray-0001.png", tmp_path / "good.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "back").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "self.dcm").symlink_to(tmp_path / "self.dcm")
    (tmp_path / "dangling.dcm").symlink_to(tmp_path / "nowhere.dcm")
    report = scan(tmp_path)
    assert len(report.usable) == 1
    reasons = _reasons(report)
    assert "symbolic link loop" in reasons["back"]
    assert "symbolic link loop" in reasons["self.dcm"]
    assert "broken symbolic link" in reasons["dangling.dcm"]


def _scan_as_nobody(root: Path) -> dict:
    """Run scan in a forked child that dropped root (modules stay loaded: no exec needed)."""
    scan(root)  # warm up lazy imports while still root
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            payload = json.dumps(scan(root).to_json()).encode()
            with os.fdopen(write_fd, "wb") as f:
                f.write(payload)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        payload = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(payload)


def test_unreadable_file_and_folder(phantom_site):
    """chmod 000 does not stop root, so as root the scan runs in a child as 'nobody'."""
    root = Path(tempfile.mkdtemp(prefix="fed-unimiss-perm-"))
    try:
        os.chmod(root, 0o755)
        shutil.copy(phantom_site / "xray" / "xray-0001.png", root / "good.png")
        shutil.copy(phantom_site / "xray" / "xray-0001.png", root / "locked.png")
        (root / "locked-dir").mkdir()
        os.chmod(root / "good.png", 0o644)
        os.chmod(root / "locked.png", 0o000)
        os.chmod(root / "locked-dir", 0o000)
        if os.geteuid() == 0:
            result = _scan_as_nobody(root)
        else:
            result = scan(root).to_json()
        reasons = {Path(r["path"]).name: r["reason"] for r in result["rejected"]}
        assert "Permission denied" in reasons["locked.png"]
        assert "cannot list folder: Permission denied" in reasons["locked-dir"]
        assert [u["name"] for u in result["usable"]] == ["good.png"]
    finally:
        os.chmod(root / "locked-dir", 0o755)
        shutil.rmtree(root, ignore_errors=True)


def test_missing_root_is_a_rejection_not_an_exception(tmp_path):
    report = scan(tmp_path / "absent")
    assert report.usable == [] and report.rejected[0].reason == "does not exist"


@pytest.mark.parametrize("payload", [b"\x00" * 200, b"DICM" * 100, os.urandom(4096)],
                         ids=["zeros", "dicm-magic-repeated", "random"])  # one id on every worker
def test_garbage_named_dcm_never_raises(tmp_path, payload):
    (tmp_path / "x.dcm").write_bytes(payload)
    (rejection,) = scan(tmp_path).rejected
    assert rejection.reason
