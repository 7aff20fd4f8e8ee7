"""Worker processes: their heartbeat rows (written by the workers) and the workers page."""
