"""Evaluation: safety and utility suites, judges and statistics."""
