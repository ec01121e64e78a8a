"""Guardrails: checks on what goes into a model and what comes out (see rails.py)."""
