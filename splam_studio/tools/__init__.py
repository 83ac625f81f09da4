"""Benchmarks, load and reliability tests, reports, the world CLI. Nothing in the library imports these."""
