"""STADI attention processors: queries of the own band, keys/values over the full image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from stadi_xdit.runtime.kv import DisplacedKVStore


class StadiSelfAttnProcessor(AttnProcessor2_0):
    """Self-attention (PixArt `attn1`) whose K/V come from a `DisplacedKVStore`.

    Cross-attention to text is untouched: text tokens are replicated on every rank.
    """

    def __init__(self, store: DisplacedKVStore, layer: int):
        super().__init__()
        self.store = store
        self.layer = layer

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("StadiSelfAttnProcessor serves self-attention without a mask only")
        residual = hidden_states
        batch, _, _ = hidden_states.shape
        head_dim = attn.to_q.out_features // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query = heads(attn.to_q(hidden_states))
        key = heads(attn.to_k(hidden_states))
        value = heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        key, value = self.store.full_kv(self.layer, key, value)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
