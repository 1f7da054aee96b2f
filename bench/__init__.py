"""Benchmarks of Duet: `python -m bench NAME ...` writes bench/results/NAME.json (and a PNG
where a curve says more). They measure and report; the test suite only checks that each one
runs on a tiny setting."""
