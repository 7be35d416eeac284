"""On-demand benchmarks and the demo; never run as timed tests."""
