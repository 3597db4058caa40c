"""Sample iMIs built from Debian packages, for tests, benchmarks and the demo."""
