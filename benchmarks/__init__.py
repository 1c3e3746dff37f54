"""Side-by-side benchmarks: our fast paths against reference paths, in one run."""
