"""A toy, trained DiT: quality of stale K/V and skipped steps measured on a real denoiser.

* `stadi_xdit.toy.data`: a procedural, class-conditioned data set of 4-channel 32x32 "latent images"
  with long-range structure (mirror symmetry, matching colours, a pole through every band boundary,
  a horizon across the midline), caption embeddings from a fixed table, and `decode_to_rgb`.
* `stadi_xdit.toy.metrics`: coherence metrics that need no learned network, per-row error profiles.
* `stadi_xdit.toy.model`: the PixArt-alpha transformer trained on it (`scripts/train_toy_dit.py`),
  `load_toy_pipeline` and `toy_call_kwargs`.
* `stadi_xdit.toy.viz`: image grids (matplotlib).

Importing this package imports nothing heavy; its submodules need torch (and diffusers for `model`).
"""
