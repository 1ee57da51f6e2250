"""Tributary: move algorithms to medical imaging data, not data to algorithms."""

__version__ = "0.1.0"
