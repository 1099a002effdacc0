"""STADI joint attention for Flux.1: text tokens replicated on every rank, image tokens banded.

Flux attends over one joint sequence ``[text, image]``:

- double-stream blocks (``transformer_blocks[i].attn``, a ``FluxAttention`` with ``added_kv_proj``)
  get the image band as ``hidden_states`` and the text as ``encoder_hidden_states``;
- single-stream blocks (``single_transformer_blocks[i].attn``) get one sequence whose first
  ``txt_len`` tokens are text and the rest the image band.

Either way the processor does what diffusers' ``FluxAttnProcessor`` does (projections, QK RMS-norm,
rotary embedding on Q and K of both streams, attention, output projections), with one change: the
image K/V of the *other* bands come from the ``DisplacedKVStore``. The store holds image K/V only,
after RoPE (each rank rotates its own band with its global ``img_ids``); the fresh text K/V are
concatenated in front at attention time, in Flux's order ``[text, image]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from stadi_xdit.runtime.kv import DisplacedKVStore


class StadiFluxAttnProcessor:
    """One processor for both Flux block kinds; `layer` is the K/V layer id in the store."""

    def __init__(self, store: DisplacedKVStore, layer: int):
        self.store = store
        self.layer = layer

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("StadiFluxAttnProcessor does not support attention masks")
        joint = encoder_hidden_states is not None  # double-stream block
        query, key, value, txt_query, txt_key, txt_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)

        # (batch, tokens, heads, head_dim), exactly as FluxAttnProcessor.
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if joint:
            if attn.added_kv_proj_dim is None:
                raise ValueError("a double-stream Flux attention needs added K/V projections")
            txt_query = attn.norm_added_q(txt_query.unflatten(-1, (-1, attn.head_dim)))
            txt_key = attn.norm_added_k(txt_key.unflatten(-1, (-1, attn.head_dim)))
            txt_value = txt_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([txt_query, query], dim=1)
            key = torch.cat([txt_key, key], dim=1)
            value = torch.cat([txt_value, value], dim=1)
            txt_len = encoder_hidden_states.shape[1]
        else:
            start, end = self.store.own_range
            txt_len = hidden_states.shape[1] - (end - start)
            if txt_len < 0:
                raise RuntimeError(f"single-stream input has {hidden_states.shape[1]} tokens, "
                                   f"fewer than the band's {end - start} image tokens")

        # The rotary table covers [txt_ids, this band's img_ids]: RoPE is per token, so rotating the
        # band here gives exactly the keys one process would have at these global positions.
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # To (batch, heads, tokens, head_dim): the store's layout and SDPA's.
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))
        image_key, image_value = self.store.full_kv(self.layer, key[:, :, txt_len:], value[:, :, txt_len:])
        key = torch.cat([key[:, :, :txt_len], image_key], dim=2)
        value = torch.cat([value[:, :, :txt_len], image_value], dim=2)

        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if not joint:
            return out
        txt_out, image_out = out.split_with_sizes([txt_len, out.shape[1] - txt_len], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        txt_out = attn.to_add_out(txt_out.contiguous())
        return image_out, txt_out
