"""`inferd bench`: drive a maintained load generator against a URL, and compare runs."""
