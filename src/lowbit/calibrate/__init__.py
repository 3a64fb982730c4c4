"""Calibration: where text comes from and which statistics of activations are kept."""
