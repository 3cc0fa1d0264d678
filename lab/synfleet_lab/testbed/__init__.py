"""Network-namespace test beds for tests, benchmarks and the demo."""
