"""The embedded engine's model: a transformers causal LM run as a batched, KV-cached decoder.

Tensor legend: B = rows in the running batch, L = cached sequence length (left-padded),
V = vocabulary size, H = KV heads, D = head dim.

Rows are left-padded: `mask_BL` marks real tokens, and every forward gets explicit position_ids
(position = number of real tokens before it), so a row computes what it would alone: a trainer's
teacher-forced recompute matches the sampled-token logprobs to < 1e-6 in fp32, also across joins
(tests/integration/engines/test_engine_generate.py). attn_implementation is "sdpa": the same
parity as "eager" (4.8e-7 both, on the tiny model) and faster.

Rows can join a running batch (`merge`: the shorter cache is left-padded) and leave it
(`select`), and the leading columns that are padding in every remaining row are dropped (`trim`).
The KV cache is transformers' DynamicCache; we edit its per-layer `keys`/`values` tensors
directly for merge and trim (transformers 5.x layout [B, H, L, D]; `_layers` checks it).

With `capture_routing`, every prefill/decode also leaves the top-k experts of each fed token in
`last_routed` (see `routing.py`): after prefill a list with one [p_i, Y, K] tensor per row (its
real tokens only, left padding dropped), after decode one [B, Y, K] tensor (row i = row i).

Only the scheduler's worker thread calls into this object.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from miles.engines.embedded.routing import RouterCapture, perturb_router_selection

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "sdpa"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Batch:
    """KV-cached state of the rows being decoded; row i of every tensor is the same request."""

    cache: object
    """transformers DynamicCache holding [B, H, L, D] keys/values per layer."""
    mask_BL: torch.Tensor
    """1 where the cache holds a real token, 0 for left padding."""
    next_pos_B: torch.Tensor
    """Position id of each row's next token (= its number of real tokens)."""

    @property
    def size(self) -> int:
        return self.mask_BL.shape[0]


class ModelRunner:
    """Loads an HF checkpoint and runs prefill / decode steps over a `Batch`."""

    def __init__(self, model_path: str | Path, dtype: str = "float32", capture_routing: bool = False,
                 router_selection_noise: float = 0.0):
        from transformers import AutoConfig, AutoModelForCausalLM

        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        self.model_path = str(model_path)
        self.dtype = dtype
        self.config = AutoConfig.from_pretrained(self.model_path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=DTYPES[dtype], attn_implementation=ATTN_IMPLEMENTATION, local_files_only=True,
        ).eval()
        self.model.requires_grad_(False)
        self.device = next(self.model.parameters()).device
        self.eos_ids = _eos_ids(self.model)
        self.context_length = int(getattr(self.config, "max_position_embeddings", 1 << 30))
        self.num_params = sum(p.numel() for p in self.model.parameters())
        if router_selection_noise:
            perturb_router_selection(self.model, router_selection_noise)
        self.routing = RouterCapture(self.model) if capture_routing else None
        self.last_routed: list[torch.Tensor] | torch.Tensor | None = None
        logger.info(
            "loaded %s (%s, %d params, dtype %s, eos %s, context %d)", self.model_path,
            type(self.model).__name__, self.num_params, dtype, sorted(self.eos_ids), self.context_length,
        )

    # -- forward passes ----------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> tuple[Batch, torch.Tensor]:
        """Run the prompts (left-padded) through the model; return their Batch and last-position logits_BV."""
        from transformers import DynamicCache

        B, L = len(prompts), max(len(p) for p in prompts)
        ids_BL = torch.zeros(B, L, dtype=torch.long)
        mask_BL = torch.zeros(B, L, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids_BL[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
            mask_BL[i, L - len(p):] = 1
        pos_BL = (mask_BL.cumsum(dim=1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids_BL.to(self.device), attention_mask=mask_BL.to(self.device), position_ids=pos_BL.to(self.device),
            cache=DynamicCache(config=self.model.config), use_cache=True, logits_to_keep=1,
        )
        batch = Batch(cache=out.cache, mask_BL=mask_BL, next_pos_B=mask_BL.sum(dim=1))
        if self.routing is not None:
            idx_BLYK = self.routing.take(B * L).view(B, L, self.routing.num_layers, self.routing.top_k)
            self.last_routed = [idx_BLYK[i, L - len(p):] for i, p in enumerate(prompts)]
        return batch, out.logits[:, -1].float().cpu()

    @torch.inference_mode()
    def decode(self, batch: Batch, tokens_B: list[int]) -> torch.Tensor:
        """Feed one token per row, grow the cache in place; return next-token logits_BV."""
        assert len(tokens_B) == batch.size
        batch.mask_BL = torch.cat([batch.mask_BL, torch.ones(batch.size, 1, dtype=torch.long)], dim=1)
        out = self.model(
            input_ids=torch.tensor(tokens_B, dtype=torch.long)[:, None].to(self.device),
            attention_mask=batch.mask_BL.to(self.device), position_ids=batch.next_pos_B[:, None].to(self.device),
            cache=batch.cache, use_cache=True,
        )
        batch.cache = out.cache
        batch.next_pos_B = batch.next_pos_B + 1
        if self.routing is not None:
            self.last_routed = self.routing.take(batch.size)
        return out.logits[:, -1].float().cpu()

    # -- batch surgery -------------------------------------------------------------------------
    def merge(self, a: Batch | None, b: Batch) -> Batch:
        """Rows of `a` then rows of `b` in one batch; the shorter cache is left-padded."""
        if a is None:
            return b
        La, Lb = a.mask_BL.shape[1], b.mask_BL.shape[1]
        L = max(La, Lb)
        for la, lb in zip(_layers(a.cache), _layers(b.cache)):
            la.keys = torch.cat([_left_pad(la.keys, L - La), _left_pad(lb.keys, L - Lb)])
            la.values = torch.cat([_left_pad(la.values, L - La), _left_pad(lb.values, L - Lb)])
        a.mask_BL = torch.cat([F.pad(a.mask_BL, (L - La, 0)), F.pad(b.mask_BL, (L - Lb, 0))])
        a.next_pos_B = torch.cat([a.next_pos_B, b.next_pos_B])
        return a

    def select(self, batch: Batch, keep: list[int]) -> Batch | None:
        """Keep only rows `keep` (in that order); drop all-padding leading columns. None if empty."""
        if not keep:
            return None
        if len(keep) < batch.size:
            idx = torch.tensor(keep, dtype=torch.long)
            for layer in _layers(batch.cache):
                layer.keys, layer.values = layer.keys[idx.to(layer.keys.device)], layer.values[idx.to(layer.keys.device)]
            batch.mask_BL, batch.next_pos_B = batch.mask_BL[idx], batch.next_pos_B[idx]
        first = int(batch.mask_BL.any(dim=0).long().argmax())
        if first > 0:
            for layer in _layers(batch.cache):
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            batch.mask_BL = batch.mask_BL[:, first:]
        return batch


def _layers(cache) -> list:
    layers = cache.layers
    for layer in layers:
        assert layer.keys.dim() == 4 and layer.keys.shape == layer.values.shape, "unexpected DynamicCache layout"
    return layers


def _left_pad(t_BHLD: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(t_BHLD, (0, 0, n, 0)) if n else t_BHLD


def _eos_ids(model) -> frozenset[int]:
    """EOS ids from generation_config and config (either may be an int or a list)."""
    ids: set[int] = set()
    for cfg in (getattr(model, "generation_config", None), model.config):
        eos = getattr(cfg, "eos_token_id", None)
        if eos is None:
            continue
        ids.update([eos] if isinstance(eos, int) else eos)
    return frozenset(int(i) for i in ids)


def load_tokenizer(model_path: str):
    """The checkpoint's tokenizer, or None when the checkpoint has none (token ids only)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    except (OSError, ValueError) as exc:
        logger.warning("no tokenizer in %s (%s); requests must use input_ids", model_path, exc)
        return None
