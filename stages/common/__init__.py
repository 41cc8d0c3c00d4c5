"""Small array helpers more than one stage relies on, so that every stage computes them alike."""
from .resize import nearest_indices

__all__ = ["nearest_indices"]
