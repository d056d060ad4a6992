"""Speed and memory benchmarks of lctx's RoPE patches; ``python -m benchmarks.run`` writes BENCHMARKS.md."""
