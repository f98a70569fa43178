"""Segmenting z-stacks with a trained model, on arrays and files: tiled prediction (`predict`),
prediction files (`files`), instance labels (`instances`), the classical baseline (`baseline`)
and holdout evaluation (`evaluate`). Nothing here knows about git; MLflow only as the place an
evaluation is logged to (`evaluate.log_to_run`)."""
