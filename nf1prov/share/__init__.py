"""Models leaving nf1prov: the MLflow Model Registry (`registry`) and bioimage.io packages
(`bioimageio`)."""
