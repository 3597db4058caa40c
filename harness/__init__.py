"""Real icbd nodes, mounts and network namespaces for the tests and the benchmarks."""
