"""Metrics (every name in `metrics`) and log set-up."""
