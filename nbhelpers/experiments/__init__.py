"""Experiments: the ablation grid, the source probe and audit, the shortcut tests, CAM explanations."""
