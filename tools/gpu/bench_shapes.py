"""Model shapes of the GPU benchmarks and their FLOP accounting (P1 MFU, P2's tensor mix).

Shapes are those of public Qwen3 checkpoints (config.json of Qwen/Qwen3-1.7B and Qwen/Qwen3-8B),
built in-process with random weights; "tiny" and "small" are for --dry-run on the CPU.

Training FLOPs per token (PaLM appendix B, the usual MFU convention):

    6 * N_matmul + 12 * L * H * D * S

N_matmul counts every weight that takes part in a matmul: per layer the q/k/v/o projections and
the SwiGLU gate/up/down, plus the output layer (lm_head, tied or not). The input embedding is a
lookup and norms are elementwise, so neither counts. The second term is attention's QK^T and AV
(L layers, H query heads of dim D, sequence S), counted over the full S x S matrix, as PaLM and
Megatron-LM do, although causal attention kernels skip about half of it.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Qwen3Shape:
    """A dense Qwen3 architecture (GQA, q/k-norm, SwiGLU, RMSNorm, RoPE)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool

    @property
    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token (see the module docstring)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.ffn
        return self.layers * per_layer + self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        """All parameters, as in the HF checkpoint (tied embeddings counted once)."""
        norms = self.layers * (2 * self.hidden + 2 * self.head_dim) + self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.matmul_params - self.vocab * self.hidden + norms + embeddings

    def train_flops_per_token(self, seq_len: int) -> float:
        """Forward + backward FLOPs per token at sequence length seq_len."""
        return 6.0 * self.matmul_params + 12.0 * self.layers * self.heads * self.head_dim * seq_len

    def hf_config(self, max_positions: int):
        """A transformers Qwen3Config of this shape (nothing is downloaded)."""
        from transformers import Qwen3Config

        return Qwen3Config(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.ffn,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
                           max_position_embeddings=max_positions, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                           tie_word_embeddings=self.tied)

    def hf_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(HF name, shape) of every weight, in checkpoint order: what a weight sync sends."""
        q, kv, h = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (q, h)),
                    (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                    (p + "self_attn.o_proj.weight", (h, q)), (p + "self_attn.q_norm.weight", (self.head_dim,)),
                    (p + "self_attn.k_norm.weight", (self.head_dim,)),
                    (p + "post_attention_layernorm.weight", (h,)), (p + "mlp.gate_proj.weight", (self.ffn, h)),
                    (p + "mlp.up_proj.weight", (self.ffn, h)), (p + "mlp.down_proj.weight", (h, self.ffn))]
        out.append(("model.norm.weight", (h,)))
        if not self.tied:
            out.append(("lm_head.weight", (self.vocab, h)))
        return out


SHAPES = {
    "qwen3-1.7b": Qwen3Shape(hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128, ffn=6144, vocab=151936,
                             tied=True),
    "qwen3-8b": Qwen3Shape(hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, ffn=12288, vocab=151936,
                           tied=False),
    "small": Qwen3Shape(hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, ffn=768, vocab=8192, tied=False),
    "tiny": Qwen3Shape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=512, tied=False),
}

PEAK_BF16_DENSE_FLOPS = (  # (substring of torch.cuda.get_device_name, FLOP/s); the first match wins
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12), ("H800", 989.4e12),
    ("H20", 148e12), ("A100", 312e12), ("GB200", 2500e12), ("B200", 2250e12),
)
"""Vendor datasheet dense (no sparsity) bf16 tensor-core peaks; SXM unless the name says otherwise."""


def peak_bf16_flops(device_name: str) -> float | None:
    """Datasheet dense bf16 FLOP/s of a GPU by its name, or None when unknown (then no MFU)."""
    for key, flops in PEAK_BF16_DENSE_FLOPS:
        if key in device_name:
            return flops
    return None


def shape_bytes(shape: Qwen3Shape, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of all weights of `shape` in `dtype` (what one full weight sync moves)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for _, dims in shape.hf_tensors():
        n = 1
        for d in dims:
            n *= d
        total += n * itemsize
    return total
