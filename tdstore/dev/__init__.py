"""Development tools: the benchmark, the crash and concurrency harnesses, the demo."""
