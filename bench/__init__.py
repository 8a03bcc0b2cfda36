"""Benchmarks of the service on the embedded stack, figures beside the targets of issue 13 / SPEC §8: the template
sender (and its growth row), the initiate endpoint (open loop) and the replies path.

Run `python -m bench --help`; bench/README.md explains each mode and figure.
"""
