"""``stadi-bench``: end-to-end latency of STADI against xDiT\x27s strategies on heterogeneous ranks."""
