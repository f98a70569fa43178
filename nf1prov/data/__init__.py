"""From TIFF files on disk to training-ready tensors (layout of DESIGN 3.5)."""
