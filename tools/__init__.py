"""Tools beside the service: the upstream emulator, the benchmark, make run, and real processes for tests and bench."""
