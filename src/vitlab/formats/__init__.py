"""Checkpoint and model file formats: vitlab's own, the official .npz, timm's and transformers', the
exports."""
