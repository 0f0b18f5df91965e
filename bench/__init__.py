"""Benchmarks: ``python -m bench`` (see bench/run.py). Results of GPU runs live in bench/results/."""
