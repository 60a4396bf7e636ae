"""The embedded engine: SGLang's HTTP API served by transformers on torch (CPU by default).

`python -m miles.engines.embedded --model-path DIR --port P` (or `miles-engine`). Modules:
server (routes), protocol (/generate JSON), scheduler (queue + worker thread), model_runner
(batched KV-cached decoding), sampling (per-request sampling and the logprob rule), weights and
update_groups (weight updates from disk or a broadcast group). Nothing is loaded at import.
"""
