"""`attn_implementation: sdpa_gqa`: PyTorch's SDPA over the grouped key/value heads as they are.

Hugging Face's `sdpa` repeats each key/value head for its query heads (a copy of the keys and values
at every layer) whenever an attention mask is given, because CUDA's fused kernels take grouped heads
only without one. Padded batches always carry a mask, so on a CPU every decoding step copied the whole
KV cache twice per layer. PyTorch's CPU kernel takes grouped heads with a mask (`enable_gqa`): on the
bundled tiny models a decoding step's attention is ~4x faster and a training pass's ~15% (measured in
benchmarks/RESULTS.md). On other devices, where a mask with grouped heads falls back to a slow kernel,
the heads are repeated under a mask as Hugging Face's `sdpa` does: the same numbers either way.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "sdpa_gqa"


def sdpa_gqa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The attention of `module` (queries `[B, H, q, d]`, keys/values `[B, H_kv, k, d]`), `[B, q, H, d]` out."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # Without a mask, a causal prompt pass uses the kernel's own causal pattern (one query: nothing to hide).
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    grouped = key.shape[1] != query.shape[1]
    if grouped and attention_mask is not None and query.device.type != "cpu":
        key, value = repeat_kv(key, query.shape[1] // key.shape[1]), repeat_kv(value, query.shape[1] // value.shape[1])
        grouped = False
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=grouped)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, sdpa_gqa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
