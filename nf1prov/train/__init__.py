"""Training: loss, metrics, the loop (`trainer.train_model`) and the Optuna search.

Import the submodules directly (`from nf1prov.train.trainer import train_model`); this package
imports nothing heavy itself, so `nf1prov --help` stays fast.
"""
