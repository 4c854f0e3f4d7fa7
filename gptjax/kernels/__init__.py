"""Hand-written Pallas kernels (GPU via Triton; interpret mode on CPU for tests)."""
