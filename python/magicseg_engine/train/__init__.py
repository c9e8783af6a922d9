"""Pretraining a segmentation model on a run directory: data loaders, synthetic data, model, loop."""
