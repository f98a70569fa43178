"""From TIFF files on disk to training-ready tensors (layout of DESIGN 3.5)."""

# The three semantic classes the model predicts (`semantic`), here where no numpy is imported:
# the catalogue names them too.
CLASS_NAMES = ("background", "inner-cell", "cell-boundary")
