#!/usr/bin/env python3
"""CPU step-time breakdown of the quickstart RL loop: rollout / reward / train / weight sync.

    python tools/bench_rl_step.py [--steps 10] [--transport distributed|disk|both] [--out FILE.json]

Runs `python -m miles.driver --recipe quickstart` for --steps RL steps (after its SFT warm-up) in
a temp run folder, once per transport, and reports the mean seconds per phase over the steps
(the first step is dropped as warm-up). Reward time is measured inside the rollout (it overlaps
generation), so "rollout" includes it. Also reports the train-infer mismatch. Writes JSON to --out
and prints one line per transport. Needs the tiny model and data that `make quickstart` builds.
"""

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from miles.engines.ports import free_port, free_port_range  # noqa: E402
PHASES = {"rollout": "time/rollout", "reward": "rollout/reward_seconds", "train": "time/train",
          "sync": "time/sync", "step": "time/step"}


def run_once(transport: str, steps: int, workdir: Path) -> dict:
    overrides = [f"run.num_steps={steps}", f"run.output_dir={workdir}", f"run.name={transport}",
                 f"weight_sync.transport={transport}", f"engine.base_port={free_port_range(2)}", f"router.port={free_port()}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-m", "miles.driver", "--recipe", "quickstart", *overrides],
                          cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the {transport} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (workdir / transport / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] >= 1 and "time/step" in r]
    out = {name: statistics.fmean(r.get(key, 0.0) for r in rows) for name, key in PHASES.items()}
    out["mismatch_max"] = max(r.get("mismatch/max", 0.0) for r in rows)
    out["sync_mb"] = statistics.fmean(r.get("weight_sync/mb", 0.0) for r in rows)
    out["steps_measured"] = len(rows)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--transport", choices=("distributed", "disk", "both"), default="both")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    transports = ("distributed", "disk") if args.transport == "both" else (args.transport,)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "host": socket.gethostname(), "cpus": os.cpu_count(), "recipe": "quickstart", "per_transport": {}}
    with tempfile.TemporaryDirectory(prefix="miles-bench-") as tmp:
        for transport in transports:
            r = run_once(transport, args.steps, Path(tmp))
            result["per_transport"][transport] = r
            print(f"{transport}: step {r['step']:.3f}s = rollout {r['rollout']:.3f}s (reward {r['reward']:.4f}s) "
                  f"+ train {r['train']:.3f}s + sync {r['sync']:.3f}s ({r['sync_mb']:.2f} MB); mismatch max {r['mismatch_max']:.2e}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
