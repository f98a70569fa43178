"""nf1prov: train NF1 organoid cell segmenters with one git commit and one MLflow run per model."""

__version__ = "0.1.0"
