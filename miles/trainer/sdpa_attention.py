"""Core attention for megatron-core's local layer spec, computed by torch SDPA on CPU and GPU.

It replaces `DotProductAttention` in `get_gpt_layer_local_spec()` (see model_provider). Same
constructor and `forward(query, key, value, attention_mask, attn_mask_type=..., ...)` contract,
but: GQA without materialising repeated K/V (`enable_gqa`), no `[b*h, s, s]` score buffer, and
`attention_mask=None` means "causal" (flash / memory-efficient kernels on GPU), so no mask has
to be built for right-padded batches.

Legend: S sequence, B batch, H attention heads of this TP rank, G query groups (K/V heads) of
this TP rank, D head dim.

Mask convention is megatron's: a bool mask broadcastable to [B, 1, S, S] where True = masked out.
A row that masks every key yields NaN (as in SDPA); right-padded batches with a causal mask
never produce one.
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPACoreAttention(MegatronModule):
    """Causal / masked multi-head attention over [S, B, H, D] inputs using F.scaled_dot_product_attention."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
        if config.apply_query_key_layer_scaling or config.softmax_type != "vanilla" or config.window_size:
            raise ValueError("SDPACoreAttention supports vanilla softmax without query-key layer "
                             "scaling or sliding windows")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.num_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.hidden_size_per_partition = self.num_heads_per_partition * config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """query [S, B, H, D], key/value [S, B, G, D] -> context [S, B, H*D]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPACoreAttention supports neither packed sequences nor attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        q_BHSD, k_BGSD, v_BGSD = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        is_causal = attention_mask is None and mask_type == AttnMaskType.causal
        keep_mask = None if attention_mask is None else ~attention_mask
        dropout_p = self.dropout_p if self.training else 0.0
        # Dropout inside the TP region draws from the model-parallel RNG, as DotProductAttention does.
        forked = dropout_p > 0 and not self.config.sequence_parallel
        with tensor_parallel.get_cuda_rng_tracker().fork() if forked else contextlib.nullcontext():
            context_BHSD = F.scaled_dot_product_attention(
                q_BHSD, k_BGSD, v_BGSD, attn_mask=keep_mask, dropout_p=dropout_p, is_causal=is_causal,
                scale=self.softmax_scale, enable_gqa=q_BHSD.size(1) != k_BGSD.size(1),
            )
        s, b = query.size(0), query.size(1)
        return context_BHSD.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)
