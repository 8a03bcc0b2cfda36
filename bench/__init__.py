"""The consumer benchmark: one service process against the embedded stack, figures vs the SPEC §8 budget.

Run `python -m bench --help`; bench/README.md explains each figure.
"""
