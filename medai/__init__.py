"""MedAI CXR: train, evaluate, serve and explain models for medical X-rays."""

__version__ = "0.1.0"
