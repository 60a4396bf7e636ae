"""SGLang `/generate` request parsing and response shapes for the embedded engine.

Request: `input_ids` (list[int], or list[list[int]] for a batch) or `text` (str or list[str]),
exactly one of them; `sampling_params` (dict, or one dict per batch item); `rid` (str or list);
`return_logprob` (bool or list); `logprob_start_len` (only -1: no prompt logprobs);
`return_text_in_logprobs`; `return_routed_experts` (bool or list; needs a server started with
`--enable-return-routed-experts`, else 400) and `routed_experts_start_len` (int in [0, prompt_len]).
Other SGLang fields are accepted only at their "off" value; anything else is a 400 naming the field.

Response (a list for the batch form):
  {"text", "output_ids", "meta_info": {"id", "finish_reason", "prompt_tokens", "completion_tokens",
   "cached_tokens": 0, "weight_version", "e2e_latency", "output_token_logprobs" (if asked),
   "routed_experts" (if asked: base64 of int32 [prompt + completion - 1 - start_len, num_layers, top_k])}}
output_token_logprobs entries are [logprob, token_id, text_or_null]. A matched stop or EOS token
IS included in output_ids and in the logprobs (SGLang keeps it in output_ids; its text is dropped
from "text" unless the tokenizer keeps special tokens).
"""

import uuid
from typing import Any

from miles.engines.embedded.routing import encode_routed_experts
from miles.engines.embedded.sampling import parse_sampling_params
from miles.engines.embedded.scheduler import Request

HANDLED_FIELDS = (
    "text", "input_ids", "sampling_params", "rid", "return_logprob", "logprob_start_len", "return_text_in_logprobs",
    "return_routed_experts", "routed_experts_start_len",
)
"""Top-level /generate fields this engine implements."""

OFF_VALUES: dict[str, tuple] = {
    "stream": (False, None), "top_logprobs_num": (0, None), "token_ids_logprob": (None,),
    "return_hidden_states": (False, None),
    "return_entropy": (False, None), "return_prompt_token_ids": (False, None), "return_sampling_mask": (False, None),
    "lora_path": (None,), "custom_logit_processor": (None,), "session_params": (None,), "input_embeds": (None,),
    "image_data": (None,), "routed_dp_rank": (None,), "data_parallel_rank": (None,), "priority": (None, 0),
    "extra_key": (None,), "cache_salt": (None,), "log_metrics": (True, False, None), "no_logs": (True, False, None),
    "modalities": (None,), "bootstrap_host": (None,), "bootstrap_port": (None,), "bootstrap_room": (None,),
}
"""SGLang fields accepted only at these values (features the embedded engine does not have)."""


class BadRequest(ValueError):
    """The request body is invalid; the message names the problem (HTTP 400)."""


ROUTED_EXPERTS_FLAG = "--enable-return-routed-experts"


def parse_generate(body: Any, tokenizer, context_length: int, vocab_size: int,
                   routed_experts_enabled: bool = False) -> tuple[list[Request], bool]:
    """Turn a /generate body into Requests; return (requests, is_batch). Raises BadRequest.

    routed_experts_enabled: the server captures routing (else return_routed_experts=true is a 400).
    """
    if not isinstance(body, dict):
        raise BadRequest("the /generate body must be a JSON object")
    for key, value in body.items():
        if key in HANDLED_FIELDS:
            continue
        if key not in OFF_VALUES:
            raise BadRequest(f"unknown /generate field {key!r}")
        if value not in OFF_VALUES[key]:
            raise BadRequest(f"/generate field {key}={value!r} is not supported by the embedded engine")
    prompts, is_batch = _prompts(body, tokenizer)
    n = len(prompts)
    params_list = _per_item(body.get("sampling_params"), n, "sampling_params", dict, is_batch)
    rids = _per_item(body.get("rid"), n, "rid", str, is_batch)
    logprob_flags = _per_item(body.get("return_logprob", False), n, "return_logprob", bool, is_batch)
    start_len = body.get("logprob_start_len", -1)
    routed_flags = _per_item(body.get("return_routed_experts", False), n, "return_routed_experts", bool, is_batch)
    routed_starts = _per_item(body.get("routed_experts_start_len", 0), n, "routed_experts_start_len", int, is_batch)
    if any(routed_flags) and not routed_experts_enabled:
        raise BadRequest(f"return_routed_experts needs the server to be started with {ROUTED_EXPERTS_FLAG}")
    requests = []
    for i, prompt in enumerate(prompts):
        if logprob_flags[i] and start_len not in (-1, None):
            raise BadRequest("logprob_start_len >= 0 (prompt logprobs) is not supported by the embedded engine; use -1")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise BadRequest(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        if len(prompt) >= context_length:
            raise BadRequest(f"the prompt has {len(prompt)} tokens; the context length is {context_length}")
        routed_start = routed_starts[i] or 0
        if isinstance(routed_start, bool) or not 0 <= routed_start <= len(prompt):
            raise BadRequest(f"routed_experts_start_len={routed_start!r} must lie in [0, {len(prompt)}] (the prompt length)")
        try:
            params = parse_sampling_params(params_list[i])
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        requests.append(Request(
            rid=rids[i] if rids[i] is not None else uuid.uuid4().hex, input_ids=prompt, params=params,
            return_logprob=bool(logprob_flags[i]), return_routed_experts=bool(routed_flags[i]),
            routed_experts_start_len=routed_start,
        ))
    return requests, is_batch


def _prompts(body: dict, tokenizer) -> tuple[list[list[int]], bool]:
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise BadRequest("give exactly one of 'text' or 'input_ids'" + (" (both were given)" if text is not None else ""))
    if ids is not None:
        if not isinstance(ids, list) or not ids:
            raise BadRequest("input_ids must be a non-empty list of token ids or a list of such lists")
        is_batch = isinstance(ids[0], list)
        prompts = ids if is_batch else [ids]
        for p in prompts:
            if not isinstance(p, list) or not p or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                raise BadRequest("input_ids must be a non-empty list of integer token ids (or a list of such lists)")
        return [list(p) for p in prompts], is_batch
    if tokenizer is None:
        raise BadRequest("this engine has no tokenizer; send input_ids instead of text")
    is_batch = isinstance(text, list)
    texts = text if is_batch else [text]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise BadRequest("text must be a string or a non-empty list of strings")
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    if any(not p for p in prompts):
        raise BadRequest("text tokenized to zero tokens")
    return prompts, is_batch


def _per_item(value: Any, n: int, name: str, kind: type, is_batch: bool) -> list:
    """Broadcast a scalar/dict field over the batch, or check a per-item list's length and types."""
    if isinstance(value, list):
        if not is_batch:
            raise BadRequest(f"{name} is a list but the request is not a batch")
        if len(value) != n:
            raise BadRequest(f"{name} has {len(value)} entries for a batch of {n}")
        items = value
    else:
        if is_batch and kind is str and value is not None:
            raise BadRequest(f"{name} must be a list of {n} strings for a batch request")
        items = [value] * n
    for item in items:
        if item is not None and not isinstance(item, kind):
            raise BadRequest(f"{name} must be {kind.__name__} (or a list of them), got {item!r}")
    return items


def format_response(req: Request, tokenizer, return_text_in_logprobs: bool = False) -> dict:
    """The SGLang response object of one finished request."""
    meta = {
        "id": req.rid,
        "finish_reason": req.finish_reason,
        "prompt_tokens": len(req.input_ids),
        "completion_tokens": len(req.output_ids),
        "cached_tokens": 0,
        "weight_version": req.weight_version,
        "e2e_latency": req.e2e_latency,
    }
    if req.return_logprob:
        meta["output_token_logprobs"] = [
            [lp, tok, tokenizer.decode([tok]) if (return_text_in_logprobs and tokenizer is not None) else None]
            for lp, tok in zip(req.output_logprobs, req.output_ids)
        ]
    if req.return_routed_experts:
        meta["routed_experts"] = _routed_experts(req)
    text = ""
    if tokenizer is not None:
        text = tokenizer.decode(req.output_ids, skip_special_tokens=req.params.skip_special_tokens)
    return {"text": text, "output_ids": list(req.output_ids), "meta_info": meta}


def _routed_experts(req: Request) -> str:
    """Base64 int32 [prompt + completion - 1 - start_len, layers, top_k] (every fed position)."""
    import torch

    idx_TYK = torch.cat(req.routed_chunks) if req.routed_chunks else torch.zeros(0, dtype=torch.int32)
    fed = len(req.input_ids) + len(req.output_ids) - 1
    if req.routed_chunks:
        assert idx_TYK.shape[0] == fed, f"routing of {idx_TYK.shape[0]} positions for {fed} fed tokens"
    return encode_routed_experts(idx_TYK[req.routed_experts_start_len:])
