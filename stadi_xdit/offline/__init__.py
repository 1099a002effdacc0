"""Offline, on this machine: random-weight diffusers pipelines of the real architectures (``pipelines``:
tiny, small and real-size presets; no hub download), an offline Hugging Face cache of them for xDiT's
runner (``hub_cache``), and the local multi-process harness (``spawn``: gloo on 127.0.0.1, a free port,
single-threaded ranks) that the benchmark, the quality runs and the tests start ranks with."""
