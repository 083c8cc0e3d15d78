"""The latency benchmark: `python -m bench` (or `make bench`) runs it; see bench/__main__.py."""
