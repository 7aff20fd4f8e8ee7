"""Datasets: upload, validation by a worker, the pages and the API."""
