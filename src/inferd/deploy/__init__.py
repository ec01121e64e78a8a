"""Deployment artifacts: Kubernetes objects, KServe resources (and, later, images and SBOMs)."""
