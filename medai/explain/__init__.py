"""Explanations: Grad-CAM family heatmaps, anatomical regions and attention shares, overlays."""
