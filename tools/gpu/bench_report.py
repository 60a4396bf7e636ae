"""The markdown report of tools/gpu/bench_gpu.py: one table per part and a status table.

`markdown_report(report)` reads the JSON that bench_gpu.py writes ({"meta": ..., "parts": {"p1": ...}})
and tolerates parts that are missing, skipped, failed or half done: it shows what is there.
"""

from collections.abc import Callable


def _fmt(value, spec: str = ".3g", unit: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:{spec}}{unit}"


def _p1(part: dict) -> list[str]:
    lines = ["## P1 trainer MFU: Megatron GPTModel forward + backward, bf16, no optimizer step", "",
             "| model | params | TP (GPUs) | seq x micro-batch | ms / iter | tokens/s | TFLOP/s per GPU | MFU | "
             "peak mem GB |", "|---|---|---|---|---|---|---|---|---|"]
    peak, device = None, None
    for job_name, job in part.get("jobs", {}).items():
        peak, device = job.get("peak_bf16_flops") or peak, job.get("device_name") or device
        for name, r in job.get("models", {}).items():
            if "error" in r:
                lines.append(f"| {name} | | {job.get('tp_size', job_name)} | | {r['error'][:120]} | | | | |")
                continue
            lines.append(f"| {name} | {r['total_params'] / 1e9:.2f} B | {r['tp_size']} | {r['seq_len']} x "
                         f"{r['micro_batch']} | {r['iter_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                         f"{r['tflops_per_gpu']:.1f} | {_fmt(r['mfu'], '.1%')} | {_fmt(r.get('peak_memory_gb'), '.1f')} |"
                         + (f" {r['note']}" if r.get("note") else ""))
        if job.get("error"):
            lines.append(f"| ({job_name} job) | | | | {job['error'].splitlines()[0][:160]} | | | | |")
    lines += ["", f"Device: {device or '?'}; peak dense bf16 {_fmt(peak and peak / 1e12, '.1f', ' TFLOP/s')}. "
              "FLOPs per token = 6 N_matmul + 12 L H D S (PaLM; N_matmul = q/k/v/o + SwiGLU weights + lm_head, "
              "attention over the full S x S). MFU = FLOPs / (iteration time x GPUs x peak); with TP=2 the "
              "slowest rank's time. Random weights and tokens, SDPA attention, megatron local layer spec."]
    if part.get("note"):
        lines.append(f"Note: {part['note']}.")
    return lines


def _p2(part: dict) -> list[str]:
    gb = part.get("bytes", 0) / 1e9
    lines = [f"## P2 weight sync: {gb:.2f} GB bf16 ({part.get('model_shape', '?')} shape, "
             f"{part.get('num_tensors', '?')} tensors), {part.get('device_pair', '?')}", "",
             "| path | GB/s | seconds (median of {}) | vs raw per-tensor NCCL |".format(part.get("repeats", "?")),
             "|---|---|---|---|"]
    rows = (("miles", f"Miles DistributedWeightSender (HTTP per {_fmt(part.get('bucket_bytes', 0) / (1 << 20) or None, '.0f')} "
                      "MB bucket, per-tensor broadcast)"),
            ("miles_flattened_bucket", "Miles DistributedWeightSender, load_format=flattened_bucket"),
            *((key, f"Miles DistributedWeightSender, {part[key].get('bucket_mb', '?')} MB buckets")
              for key in sorted((k for k in part if k.startswith("miles_bucket_") and isinstance(part[k], dict)),
                               key=lambda k: part[k].get("bucket_mb", 0))),
            ("raw_per_tensor", "raw NCCL broadcast, tensor by tensor"),
            ("raw_flat", "raw NCCL broadcast, one flat buffer"))
    for key, label in rows:
        r = part.get(key)
        if r:
            lines.append(f"| {label} | {r['gb_per_s']:.2f} | {r['seconds_median']:.4f} | "
                         f"{_fmt(r.get('ratio_to_raw_per_tensor', 1.0 if key == 'raw_per_tensor' else None), '.2f')} |")
    lines += ["", f"Receiver: {part.get('receiver', '?')}. First (warm-up) send: "
              f"{_fmt(part.get('miles_first_send_seconds'), '.3f', ' s')}; group connect "
              f"{_fmt(part.get('connect_seconds'), '.3f', ' s')}."]
    return lines


def _p3(part: dict) -> list[str]:
    lines = [f"## P3 rollout tokens/s: {part.get('engine', '?')}, {part.get('requests', '?')} concurrent requests x "
             f"{part.get('new_tokens', '?')} new tokens (ignore_eos), prompt {part.get('prompt_len', '?')} tokens", "",
             f"| path | tokens/s (median of {part.get('rounds', '?')}) | vs direct |", "|---|---|---|"]
    labels = {"direct": "direct /generate to the engine (EngineClient)",
              "router": "through the Miles router (EngineClient)",
              "rollout_client": "Miles RolloutClient through the router"}
    paths = part.get("paths", {})
    for key in [*labels, *(k for k in paths if k not in labels)]:
        if key not in paths:
            continue
        r = paths[key]
        lines.append(f"| {labels.get(key, key)} | {r['tokens_per_s']:,.0f} | {_fmt(r.get('ratio_to_direct'), '.3f')} |")
    lines += ["", f"Model: {part.get('model_path', '?')}; engine start {_fmt(part.get('engine_start_seconds'), '.0f', ' s')}."]
    return lines


def _p4(part: dict) -> list[str]:
    import json

    text = json.dumps(part.get("result"), indent=1, sort_keys=True, default=str)
    return ["## P4 kernels (tools/gpu/bench_kernel.py; its JSON, the other benchmark owns the format)", "",
            "```json", text[:4000] + ("\n..." if len(text) > 4000 else ""), "```"]


_SECTIONS: dict[str, Callable[[dict], list[str]]] = {"p1": _p1, "p2": _p2, "p3": _p3, "p4": _p4}


def markdown_report(report: dict) -> str:
    meta = report.get("meta", {})
    lines = ["# GPU benchmarks (tools/gpu/bench_gpu.py)" + (" -- DRY RUN on CPU, numbers mean nothing"
                                                           if meta.get("dry_run") else ""), "",
             f"{meta.get('date', '?')} on {meta.get('host', '?')} (git {meta.get('git') or '?'}); GPUs: "
             f"{'; '.join(meta.get('gpus') or []) or meta.get('num_gpus', '?')}; versions: "
             f"{', '.join(f'{k} {v}' for k, v in (meta.get('versions') or {}).items() if v)}", ""]
    parts = report.get("parts", {})
    for name, part in parts.items():
        if part.get("status") in ("ok", "partial") or (part.get("status") == "failed" and len(part) > 3):
            lines += _SECTIONS[name](part) + [""]
    lines += ["## Status", "", "| part | status | seconds | reason / error |", "|---|---|---|---|"]
    for name, part in parts.items():
        why = part.get("reason") or (part.get("error") or "").splitlines()[0:1]
        why = why if isinstance(why, str) else (why[0] if why else "")
        why = why[:200].replace("|", "\\|")
        lines.append(f"| {name.upper()} | {part.get('status')} | {part.get('seconds', '?')} | {why} |")
    return "\n".join(lines) + "\n"
