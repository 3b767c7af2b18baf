"""Benchmarks: run all with ``python -m bench`` (or one: ``python -m bench decode``).

Every benchmark measures its baseline in the same run and reports ratios, because
these machines are shared and noisy: compare ratios, not absolute times.
"""
