"""Experiment tooling built on the library: bench, sweep (compare), variance, evaluate (eval),
report and sampling (sample). Nothing in the library imports these."""
