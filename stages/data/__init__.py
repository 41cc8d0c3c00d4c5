"""Dataset layer: index a dataset in place (VOC 2012 or folder layout) and read its files.

Every stage reads images and labels through this package; images are never copied into the
artifact store. ``make_demo`` writes a small synthetic dataset for the MaskContrast demo.
"""
from .demo import make_demo
from .index import DataError, DatasetIndex, Sample
from .io import BadInputError, load_image, load_label, read_sample

__all__ = [
    "BadInputError",
    "DataError",
    "DatasetIndex",
    "Sample",
    "load_image",
    "load_label",
    "make_demo",
    "read_sample",
]
