"""Per-request sampling for the embedded engine, and the logprob rule it reports.

Tensor legend: B = rows in the batch, V = vocabulary size.

Logprob rule (SGLang's default, sglang/srt/layers/sampler.py):
- sampled: log_softmax(logits.float() / temperature) of the sampled token, NOT renormalised
  after top-k / top-p / min-p truncation;
- greedy (temperature < 1e-5): log_softmax(logits.float()) of the argmax token.
So a trainer's teacher-forced recompute with the same weights and temperature reproduces it.

`min_new_tokens` is enforced by removing EOS and stop tokens from the sampling distribution only;
the reported logprob still follows the rule above (SGLang folds that mask into its logits; we keep
the trainer-reproducible value instead).

Determinism: every request owns a torch.Generator (seeded from `seed`/`sampling_seed`, or from the
engine's seed stream) and draws exactly one uniform per sampled token, so a seeded request gives the
same tokens alone or batched with others.
"""

from dataclasses import dataclass, field

import torch

GREEDY_EPS = 1e-5
"""Temperatures below this mean greedy decoding (SGLang's rule)."""

SUPPORTED_KEYS = (
    "max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop_token_ids",
    "ignore_eos", "seed", "sampling_seed", "n", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "stop", "frequency_penalty", "presence_penalty", "repetition_penalty",
)
"""sampling_params keys this engine reads (some only at their default value, see _UNSUPPORTED_VALUES)."""

_UNSUPPORTED_VALUES = {"n": 1, "stop": None, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0}
"""SGLang keys accepted only at the value that means 'off' (stop strings and penalties are not implemented)."""

_SGLANG_ONLY_KEYS = (
    "stop_regex", "json_schema", "regex", "ebnf", "structural_tag", "logit_bias", "custom_params",
    "stream_interval", "beam_width",
)
"""SGLang keys this engine does not implement; any value other than null is rejected."""


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings, validated (SGLang names and defaults)."""

    max_new_tokens: int = 128
    """Most tokens to generate."""
    min_new_tokens: int = 0
    """EOS and stop tokens cannot be sampled before this many tokens."""
    temperature: float = 1.0
    """Softmax temperature; below 1e-5 means greedy."""
    top_p: float = 1.0
    """Nucleus truncation of the sampling distribution (1.0 = off)."""
    top_k: int = -1
    """Keep only the k most likely tokens (-1 = all)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top probability (0 = off)."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end the request (kept in output_ids)."""
    ignore_eos: bool = False
    """Do not stop at the model's EOS token(s)."""
    seed: int | None = None
    """Per-request sampling seed (SGLang: sampling_seed); None draws one from the engine's seed stream."""
    skip_special_tokens: bool = True
    """Drop special tokens when decoding the response text."""
    spaces_between_special_tokens: bool = True
    """Accepted for SGLang compatibility; the tokenizer's decode decides spacing."""

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


def parse_sampling_params(raw: dict | None) -> SamplingParams:
    """Validate a SGLang `sampling_params` dict; raise ValueError naming the offending key."""
    raw = dict(raw or {})
    for key in raw:
        if key in _SGLANG_ONLY_KEYS:
            if raw[key] is not None:
                raise ValueError(f"sampling_params.{key} is not supported by the embedded engine")
        elif key not in SUPPORTED_KEYS:
            raise ValueError(f"unknown sampling_params key {key!r}; known keys: {', '.join(SUPPORTED_KEYS)}")
    for key, off in _UNSUPPORTED_VALUES.items():
        if raw.get(key) not in (None, off) and not (key == "stop" and raw.get(key) in ([], "")):
            raise ValueError(f"sampling_params.{key}={raw[key]!r} is not supported by the embedded engine (only {off!r})")
    seed = raw.get("sampling_seed", raw.get("seed"))
    params = SamplingParams(
        max_new_tokens=_int(raw, "max_new_tokens", 128),
        min_new_tokens=_int(raw, "min_new_tokens", 0),
        temperature=_float(raw, "temperature", 1.0),
        top_p=_float(raw, "top_p", 1.0),
        top_k=_int(raw, "top_k", -1),
        min_p=_float(raw, "min_p", 0.0),
        stop_token_ids=tuple(int(t) for t in (raw.get("stop_token_ids") or ())),
        ignore_eos=bool(raw.get("ignore_eos", False)),
        seed=None if seed is None else int(seed),
        skip_special_tokens=bool(raw.get("skip_special_tokens", True)),
        spaces_between_special_tokens=bool(raw.get("spaces_between_special_tokens", True)),
    )
    if params.max_new_tokens < 0 or params.min_new_tokens < 0:
        raise ValueError("sampling_params.max_new_tokens and min_new_tokens must be >= 0")
    if params.temperature < 0:
        raise ValueError(f"sampling_params.temperature must be >= 0, got {params.temperature}")
    if not 0.0 < params.top_p <= 1.0:
        raise ValueError(f"sampling_params.top_p must be in (0, 1], got {params.top_p}")
    if params.top_k == 0 or params.top_k < -1:
        raise ValueError(f"sampling_params.top_k must be -1 (all) or >= 1, got {params.top_k}")
    if not 0.0 <= params.min_p <= 1.0:
        raise ValueError(f"sampling_params.min_p must be in [0, 1], got {params.min_p}")
    return params


def _int(raw: dict, key: str, default: int) -> int:
    value = raw.get(key, default)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"sampling_params.{key} must be an integer, got {value!r}")
    return int(value)


def _float(raw: dict, key: str, default: float) -> float:
    value = raw.get(key, default)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"sampling_params.{key} must be a number, got {value!r}")
    return float(value)


@dataclass
class RowSampler:
    """The sampling state of one request: its params, generator and banned-token set."""

    params: SamplingParams
    generator: torch.Generator
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    """EOS (unless ignore_eos) plus stop_token_ids: the tokens that finish the request."""


def make_row_sampler(params: SamplingParams, eos_ids: frozenset[int], fallback_seed: int) -> RowSampler:
    """Build the per-request state; fallback_seed is used when the request has no seed."""
    generator = torch.Generator().manual_seed(params.seed if params.seed is not None else fallback_seed)
    stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_ids)
    return RowSampler(params=params, generator=generator, stop_ids=stop_ids)


def sample_rows(logits_BV: torch.Tensor, rows: list[RowSampler], num_generated: list[int]) -> tuple[list[int], list[float]]:
    """Sample one token per row; return (token ids, logprobs under the logprob rule).

    num_generated[i] is how many tokens row i already has (for min_new_tokens).
    """
    B, V = logits_BV.shape
    assert len(rows) == B == len(num_generated)
    logits_BV = logits_BV.float()
    temps_B = torch.tensor([1.0 if r.params.greedy else r.params.temperature for r in rows])
    logprobs_BV = torch.log_softmax(logits_BV / temps_B[:, None], dim=-1)
    # min_new_tokens: finishing tokens are removed from the choice only, never from the logprob.
    banned = {
        i: [t for t in r.stop_ids if 0 <= t < V]
        for i, r in enumerate(rows) if num_generated[i] < r.params.min_new_tokens and r.stop_ids
    }
    choice_BV = logits_BV
    if banned:
        choice_BV = logits_BV.clone()
        for i, ids in banned.items():
            choice_BV[i, ids] = float("-inf")
    tokens_B = choice_BV.argmax(dim=-1)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        idx = torch.tensor(sampled)
        probs_SV = torch.softmax(choice_BV[idx] / temps_B[idx, None], dim=-1)
        uniforms_S = torch.cat([torch.rand(1, generator=rows[i].generator) for i in sampled])
        tokens_B[idx] = _draw(probs_SV, [rows[i].params for i in sampled], uniforms_S)
    token_list = tokens_B.tolist()
    lp_list = logprobs_BV.gather(1, tokens_B[:, None]).squeeze(1).tolist()
    return token_list, lp_list


def _draw(probs_SV: torch.Tensor, params: list[SamplingParams], uniforms_S: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw per row from its (truncated, unnormalised) distribution.

    Rows with top-k/top-p/min-p draw over tokens sorted by probability, the others over the vocab
    order; a row's path depends only on its own params, so a seeded row picks the same token
    whatever it is batched with.
    """
    picks_S = torch.empty(len(params), dtype=torch.long)
    truncated = torch.tensor([p.top_k != -1 or p.top_p < 1.0 or p.min_p > 0.0 for p in params])
    plain = (~truncated).nonzero().squeeze(1)
    if len(plain):
        picks_S[plain] = _inverse_cdf(probs_SV[plain], uniforms_S[plain])
    trunc = truncated.nonzero().squeeze(1)
    if len(trunc):
        sorted_TV, order_TV = probs_SV[trunc].sort(dim=-1, descending=True, stable=True)
        V = sorted_TV.shape[1]
        sub = [params[i] for i in trunc.tolist()]
        top_k_T = torch.tensor([p.top_k if p.top_k != -1 else V for p in sub])
        top_p_T = torch.tensor([p.top_p for p in sub])
        min_p_T = torch.tensor([p.min_p for p in sub])
        keep_TV = torch.arange(V)[None, :] < top_k_T[:, None]
        keep_TV &= (sorted_TV.cumsum(-1) - sorted_TV) < top_p_T[:, None] * sorted_TV.sum(-1, keepdim=True)
        keep_TV &= sorted_TV >= min_p_T[:, None] * sorted_TV[:, :1]
        keep_TV[:, 0] = True
        ranks_T = _inverse_cdf(sorted_TV * keep_TV, uniforms_S[trunc])
        picks_S[trunc] = order_TV.gather(1, ranks_T[:, None]).squeeze(1)
    return picks_S


def _inverse_cdf(weights_RV: torch.Tensor, uniforms_R: torch.Tensor) -> torch.Tensor:
    """Index i with cdf[i-1] <= u * total < cdf[i]: never a zero-weight entry."""
    cdf_RV = weights_RV.cumsum(dim=-1)
    targets_R = uniforms_R * cdf_RV[:, -1]
    return torch.searchsorted(cdf_RV, targets_R[:, None], right=True).squeeze(1).clamp(max=weights_RV.shape[1] - 1)
