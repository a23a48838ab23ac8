"""Site data layer: readers (DICOM series, NIfTI, MetaImage, X-ray DICOM/PNG/JPEG), the
:class:`Sample` type, preprocessing, the memory-mapped site cache, datasets and phantoms.

Heavy modules are imported by their users (``fed_unimiss.data.cache``, ``.datasets``, ...);
this package import stays cheap.
"""

from fed_unimiss.data.config import DataConfig, load_data_config
from fed_unimiss.data.sample import DataError, Rejection, Sample

__all__ = ["DataConfig", "DataError", "Rejection", "Sample", "load_data_config"]
