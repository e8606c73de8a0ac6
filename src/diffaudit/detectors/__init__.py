"""Detectors: statistics of a trained generator that flag memorization without a candidate set (Wen et al.)."""
