"""Deliberately empty: `make bench` runs gunicorn with its plain defaults (one sync worker) as the baseline."""
