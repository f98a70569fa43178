"""Provenance: the git commit, MLflow tags and liveness that tie a model to its code."""
