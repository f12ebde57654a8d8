"""Metrics, operating thresholds and calibration (scikit-learn underneath)."""
