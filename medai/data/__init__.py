"""Data: safe decoding, preprocessing and datasets."""
