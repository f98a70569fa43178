"""Training: loss, metrics, the loop (`trainer`), the Optuna search (`search`) and the entry point
that picks one of the two (`run.train_model`).

Import the submodules directly (`from nf1prov.train.run import train_model`); this package
imports nothing heavy itself, so `nf1prov --help` stays fast.
"""
