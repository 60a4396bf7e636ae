#!/usr/bin/env python3
"""R3 study and benchmark on CPU: train-infer mismatch with and without routing replay, R3's share
of the trainer's step time, routing bytes per token, and dump store MB/s.

    python tools/bench_r3.py [--out bench-results/r3.json] [--samples 32] [--skip-store]

Everything runs in this process on one gloo rank, on a tiny Qwen3-MoE (4 layers, 16 experts, top-4,
random weights) built into a temp folder:
- "engine": the embedded engine's model code (transformers + miles.engines.embedded.routing): the
  router hook that serves `routed_experts`, and optionally `--router-selection-noise` (the routers
  pick their top-k from a perturbed weight, gating weights unchanged) or bf16 weights;
- "trainer": MegatronActor (fp32) log-probs of the same sequences, plain or replaying the engine's
  routing (R3, read back from the HDF5 dump store).
Mismatch = |engine log-prob - trainer log-prob| over response tokens (max and mean). "routing
differs" = share of (token, layer) top-k sets that differ from the unperturbed fp32 router's.
The step-time share times compute_logprobs + one train_rl step with and without replay, alternated
over --repeats runs (medians); the dump-store part calls tools/bench_r3_store.py.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

PROMPT_LEN, RESPONSE_LEN = 8, 24


def build_model(out: Path) -> Path:
    subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_model.py"), str(out), "--moe", "--layers", "4",
                    "--experts", "16", "--top-k", "4", "--hidden", "64"], check=True, stdout=subprocess.DEVNULL)
    return out


def engine_pass(model_dir: Path, sequences: list[list[int]], dtype: torch.dtype, noise: float):
    """(response log-probs per sequence, routing dumps [T, L, K] per sequence) of the engine's model."""
    from transformers import AutoModelForCausalLM

    from miles.engines.embedded.routing import RouterCapture, perturb_router_selection

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    if noise:
        perturb_router_selection(model, noise)
    capture = RouterCapture(model)
    logprobs, dumps = [], []
    with torch.no_grad():
        for ids in sequences:
            logits = model(torch.tensor([ids])).logits[0].float()
            lp = torch.log_softmax(logits, dim=-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
            logprobs.append(lp[PROMPT_LEN - 1:])
            dumps.append(capture.take(len(ids))[:-1].numpy())
    capture.remove()
    return logprobs, dumps


def sample_sequences(model_dir: Path, n: int, seed: int) -> list[list[int]]:
    """n prompt + response token lists: random prompts, responses sampled from the model (T = 1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(10, model.config.vocab_size, (n, PROMPT_LEN), generator=gen)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(prompts, do_sample=True, max_new_tokens=RESPONSE_LEN, min_new_tokens=RESPONSE_LEN,
                             top_k=0, top_p=1.0, pad_token_id=0)
    return [row.tolist() for row in out]


def differs(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Share of (token, layer) top-k expert sets that differ between two routings."""
    total = changed = 0
    for x, y in zip(a, b):
        sx, sy = np.sort(x, axis=-1), np.sort(y, axis=-1)
        changed += int((sx != sy).any(axis=-1).sum())
        total += sx.shape[0] * sx.shape[1]
    return changed / total


def mismatch(engine: list[torch.Tensor], trainer: list[torch.Tensor]) -> dict[str, float]:
    diffs = torch.cat([(e - t).abs() for e, t in zip(engine, trainer)])
    return {"max": diffs.max().item(), "mean": diffs.mean().item()}


def study(model_dir: Path, store_root: Path, n: int, repeats: int) -> dict:
    from miles.algo.config import AlgoConfig
    from miles.rollout.sample import Sample
    from miles.routing.dump_store import RoutingDumpStore
    from miles.trainer import cpu_compat
    from miles.trainer.actor import MegatronActor
    from miles.trainer.config import TrainerConfig
    from miles.trainer.parallel import init_parallel, teardown_parallel
    from miles.engines.ports import free_port

    cpu_compat.apply_cpu_compat()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    parallel = init_parallel(tp_size=1, seed=1234, env=env)
    try:
        sequences = sample_sequences(model_dir, n, seed=0)
        samples = [Sample(group_id=i // 4, index=i % 4, prompt_tokens=s[:PROMPT_LEN], response_tokens=s[PROMPT_LEN:],
                          loss_mask=[1] * RESPONSE_LEN) for i, s in enumerate(sequences)]
        cfg = TrainerConfig(lr=1e-3, micro_batch_size=8)
        plain_actor = MegatronActor(str(model_dir), cfg, AlgoConfig(), parallel)
        trainer_plain = plain_actor.compute_logprobs(samples)
        store = RoutingDumpStore(store_root)
        hf = plain_actor.hf_config
        _, reference_routing = engine_pass(model_dir, sequences, torch.float32, 0.0)

        rows = []
        for label, dtype, noise in (("fp32 engine, same router", torch.float32, 0.0),
                                    ("fp32 engine, router selection noise 0.1", torch.float32, 0.1),
                                    ("fp32 engine, router selection noise 0.3", torch.float32, 0.3),
                                    ("fp32 engine, router selection noise 1.0", torch.float32, 1.0),
                                    ("bf16 engine", torch.bfloat16, 0.0)):
            engine_lp, dumps = engine_pass(model_dir, sequences, dtype, noise)
            step = len(rows)
            with store.writer(step, hf.num_hidden_layers, hf.num_experts_per_tok, hf.num_experts) as writer:
                refs = [writer.add(s.sample_id, d) for s, d in zip(samples, dumps)]
            for s, ref in zip(samples, refs):
                s.routed_experts_ref = ref
            source = lambda chosen: store.read([s.routed_experts_ref for s in chosen])  # noqa: E731
            replay_actor = MegatronActor(str(model_dir), cfg, AlgoConfig(), parallel, routing_source=source)
            trainer_r3 = replay_actor.compute_logprobs(samples)
            rows.append({"condition": label, "routing_differs": differs(dumps, reference_routing),
                         "without_r3": mismatch(engine_lp, trainer_plain), "with_r3": mismatch(engine_lp, trainer_r3)})
            print(f"{label:42s} routing differs {rows[-1]['routing_differs']:.1%}  mismatch max "
                  f"without R3 {rows[-1]['without_r3']['max']:.2e}  with R3 {rows[-1]['with_r3']['max']:.2e}", flush=True)
            del replay_actor

        # R3's share of the trainer step: the same work with and without replay (the noise-1.0 dumps).
        for s, ref in zip(samples, refs):
            s.routed_experts_ref = ref
        read_seconds = [0.0]

        def timed_source(chosen):
            began = time.perf_counter()
            out = store.read([s.routed_experts_ref for s in chosen])
            read_seconds[0] += time.perf_counter() - began
            return out

        actors = {"plain": MegatronActor(str(model_dir), cfg, AlgoConfig(), parallel),
                  "r3": MegatronActor(str(model_dir), cfg, AlgoConfig(), parallel, routing_source=timed_source)}
        times = {"plain": [], "r3": []}
        reads = []
        advantages = [torch.full((RESPONSE_LEN,), 1.0 if i % 2 else -1.0) for i in range(n)]
        for _ in range(repeats):
            for name, actor in actors.items():
                read_seconds[0] = 0.0
                began = time.perf_counter()
                old = actor.compute_logprobs(samples)
                actor.train_rl(samples, advantages, old)
                times[name].append(time.perf_counter() - began)
                if name == "r3":
                    reads.append(read_seconds[0])
        plain_s, r3_s = statistics.median(times["plain"]), statistics.median(times["r3"])
        step = {"plain_seconds": plain_s, "r3_seconds": r3_s, "r3_share": (r3_s - plain_s) / r3_s,
                "dump_read_seconds": statistics.median(reads), "dump_read_share": statistics.median(reads) / r3_s,
                "samples": n, "tokens_per_sample": PROMPT_LEN + RESPONSE_LEN, "repeats": repeats}
        tokens = n * (PROMPT_LEN + RESPONSE_LEN - 1)
        bytes_info = {"bytes_per_token_raw": hf.num_hidden_layers * hf.num_experts_per_tok * 4,
                      "bytes_per_token_on_disk": store.bytes_per_token(len(rows) - 1), "tokens_per_step": tokens}
        return {"model": {"layers": hf.num_hidden_layers, "experts": hf.num_experts, "top_k": hf.num_experts_per_tok,
                          "hidden": hf.hidden_size},
                "mismatch": rows, "step_time": step, "routing_bytes": bytes_info}
    finally:
        teardown_parallel()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-store", action="store_true", help="skip the dump store MB/s benchmark")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory(prefix="miles-bench-r3-") as tmp:
        result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "host_cpus": os.cpu_count(),
                  **study(build_model(Path(tmp) / "moe"), Path(tmp) / "dumps", args.samples, args.repeats)}
        if not args.skip_store:
            sys.path.insert(0, str(REPO / "tools"))
            from bench_r3_store import run as store_bench

            result["dump_store"] = store_bench()
    st = result["step_time"]
    print(f"R3 step share {st['r3_share']:.1%} (plain {st['plain_seconds']:.2f} s, R3 {st['r3_seconds']:.2f} s; "
          f"dump reads {st['dump_read_share']:.1%}); routing {result['routing_bytes']['bytes_per_token_on_disk']:.1f} "
          f"B/token on disk ({result['routing_bytes']['bytes_per_token_raw']} raw)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
