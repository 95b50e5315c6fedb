"""Combining frames: clipped stacking (``stacking``), master bias and dark (``masters``) and
the image statistics behind their QC (``qc``)."""
