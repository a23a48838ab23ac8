"""NIfTI (.nii, .nii.gz) and MetaImage (.mhd) volumes -> (D, H, W) arrays with spacing.

NIfTI goes through nibabel only: :func:`nibabel.as_closest_canonical` reorients the voxel grid to
RAS+, after which the array is transposed from (x, y, z) to (z, y, x) so that axis 0 runs along
the slice normal (inferior -> superior), like a DICOM series sorted along its normal; rows and
columns are then flipped to the usual axial DICOM layout (anterior at the top, patient's right on
the left). Values are
taken as Hounsfield units after nibabel applies scl_slope/scl_inter; a volume that is not CT in
HU cannot be told apart here, so sites should export CT in HU.

MetaImage support is deliberately small: the text header is parsed for DimSize, ElementSpacing,
ElementType, byte order and the data file; the raw file is plain bytes read with numpy.
Compressed MetaImage and oblique direction matrices are rejected with a reason.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from fed_unimiss.data.sample import DataError

__all__ = ["read_nifti", "read_metaimage", "metaimage_data_file"]


def _check_volume(array: np.ndarray, spacing: tuple[float, ...]) -> None:
    if array.ndim != 3:
        raise DataError(f"{array.ndim}D image where a volume is expected (shape {array.shape})")
    if min(array.shape) < 2:
        raise DataError(f"a single slice where a volume is expected (shape {array.shape})")
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise DataError(f"voxel spacing must be positive, got {spacing}")
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise DataError(f"{bad} voxel(s) are NaN or infinite")


def read_nifti(path: Path, *, with_data: bool = True) -> tuple[np.ndarray | None,
                                                               tuple[int, int, int],
                                                               tuple[float, float, float]]:
    """Return (volume (D, H, W) float32 or None, shape, spacing (z, y, x) mm) of a NIfTI file."""
    try:
        image = nib.load(str(path))
    except Exception as e:  # nibabel raises ImageFileError, EOFError, OSError, zlib errors...
        raise DataError(f"not a readable NIfTI file ({type(e).__name__}: {e})") from e
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        image = image.slicer[..., 0]
        shape = image.shape
    if len(shape) != 3:
        raise DataError(f"{len(shape)}D image where a volume is expected (shape {tuple(shape)})")
    try:
        canonical = nib.as_closest_canonical(image)
    except Exception as e:
        raise DataError(f"cannot reorient to RAS ({type(e).__name__}: {e})") from e
    zooms = canonical.header.get_zooms()[:3]
    spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
    out_shape = tuple(int(s) for s in canonical.shape[::-1])
    if not with_data:
        _check_volume(np.zeros((2, 2, 2), np.float32), spacing)
        if min(out_shape) < 2:
            raise DataError(f"a single slice where a volume is expected (shape {out_shape})")
        return None, out_shape, spacing
    try:
        data = np.asarray(canonical.get_fdata(dtype=np.float32))
    except Exception as e:
        raise DataError(f"cannot read NIfTI voxel data ({type(e).__name__}: {e})") from e
    # RAS (x, y, z) -> (z, y, x), then flip y and x: rows run anterior -> posterior and columns
    # right -> left, the layout of an axial DICOM slice, so both sources look alike.
    volume = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])
    _check_volume(volume, spacing)
    return volume, out_shape, spacing


_MET_TYPES = {"MET_UCHAR": "u1", "MET_CHAR": "i1", "MET_USHORT": "u2", "MET_SHORT": "i2",
              "MET_UINT": "u4", "MET_INT": "i4", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}


def _parse_mhd(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(errors="strict")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read MetaImage header ({e})") from e
    fields = {}
    for line in text.splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            fields[key.strip()] = value.strip()
    return fields


def metaimage_data_file(path: Path) -> Path | None:
    """The raw file a .mhd header points to (so a scan does not report it separately)."""
    try:
        name = _parse_mhd(path).get("ElementDataFile")
    except DataError:
        return None
    return None if not name or name == "LOCAL" else path.parent / name


def read_metaimage(path: Path, *, with_data: bool = True):
    """Same contract as :func:`read_nifti` for an uncompressed 3D MetaImage (.mhd + raw)."""
    f = _parse_mhd(path)
    try:
        dims = [int(v) for v in f["DimSize"].split()]
        spacing_xyz = [float(v) for v in f.get("ElementSpacing", "1 1 1").split()]
        dtype = np.dtype(_MET_TYPES[f["ElementType"]])
    except (KeyError, ValueError) as e:
        raise DataError(f"MetaImage header lacks or garbles {e}") from e
    if len(dims) != 3:
        raise DataError(f"{len(dims)}D image where a volume is expected (DimSize {dims})")
    if f.get("CompressedData", "False").lower() == "true":
        raise DataError("compressed MetaImage is not supported; save it uncompressed or as NIfTI")
    matrix = [float(v) for v in f.get("TransformMatrix", "1 0 0 0 1 0 0 0 1").split()]
    if len(matrix) != 9 or np.abs(np.abs(np.asarray(matrix)).reshape(3, 3) - np.eye(3)).max() > 1e-3:
        raise DataError("oblique MetaImage orientation is not supported")
    msb = f.get("BinaryDataByteOrderMSB", f.get("ElementByteOrderMSB", "False")).lower() == "true"
    dtype = dtype.newbyteorder(">" if msb else "<")
    shape = (dims[2], dims[1], dims[0])
    spacing = (spacing_xyz[2], spacing_xyz[1], spacing_xyz[0])
    raw = metaimage_data_file(path)
    if raw is None:
        raise DataError("MetaImage with embedded (LOCAL) data is not supported")
    expected = int(np.prod(shape)) * dtype.itemsize
    try:
        size = raw.stat().st_size
    except OSError as e:
        raise DataError(f"MetaImage data file {raw.name} cannot be read ({e.strerror})") from e
    if size < expected:
        raise DataError(f"MetaImage data file {raw.name} is truncated: {size} of {expected} bytes")
    if not with_data:
        _check_volume(np.zeros((2, 2, 2), np.float32), spacing)
        return None, shape, spacing
    volume = np.fromfile(raw, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
    # Flip axes whose direction cosine is negative, so every axis runs along +x, +y, +z.
    flips = tuple(2 - i for i in range(3) if matrix[4 * i] < 0)
    volume = np.ascontiguousarray(np.flip(volume, axis=flips) if flips else volume, np.float32)
    _check_volume(volume, spacing)
    return volume, shape, spacing
