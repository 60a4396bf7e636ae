"""The CPU quickstart: rollouts on the embedded engine, end to end, on a tiny offline model.

    make quickstart                                   # builds model + data, then runs this
    python -m miles.quickstart [--recipe quickstart] [--steps 3] [section.key=value ...]

What it runs today (the rollout half): two embedded engines and the router as local processes,
then `--steps` rollout steps through the real rollout client: sample n responses per prompt,
score them with the recipe's reward function, apply the dynamic filter, and log the metrics to
run_dir/metrics.jsonl. The RL update (trainer + weight sync) joins this loop in miles/driver.py.
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from miles.config.loader import load_config, run_dir, write_resolved_config
from miles.config.plugins import resolve_plugins
from miles.errors import ConfigError
from miles.launchers.local import LocalRollout
from miles.rollout.client import RolloutClient
from miles.rollout.data_source import JsonlPromptSource

logger = logging.getLogger("miles.quickstart")


def run(recipe: str, overrides: list[str], steps: int) -> list[dict]:
    """Run `steps` rollout steps; return one metrics dict per step."""
    from transformers import AutoTokenizer

    cfg = load_config(recipe, overrides)
    out_dir = run_dir(cfg)
    write_resolved_config(cfg, out_dir)
    if not Path(cfg.rollout.data_path).is_file():
        raise ConfigError(
            f"rollout.data_path={cfg.rollout.data_path!r} does not exist; generate it with "
            f"`python -m miles.rollout.synthetic {cfg.rollout.data_path}`"
        )
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    plugins = resolve_plugins(cfg)
    rc = cfg.rollout
    source = JsonlPromptSource(
        rc.data_path, tokenizer=tokenizer, prompt_key=rc.prompt_key, label_key=rc.label_key,
        apply_chat_template=rc.apply_chat_template, shuffle=rc.shuffle, seed=cfg.run.seed,
    )
    history = []
    with LocalRollout(cfg, out_dir) as rollout, open(out_dir / "metrics.jsonl", "a") as metrics_file:
        client = RolloutClient(
            rollout.router_url, rc, plugins["reward.fn"], tokenizer, [tokenizer.eos_token_id],
            dynamic_filter=plugins.get("rollout.dynamic_filter"), seed=cfg.run.seed,
        )
        for step in range(steps):
            batch = client.generate_sync(source.next_prompts(rc.rollout_batch_size))
            record = {"step": step, **batch.metrics}
            metrics_file.write(json.dumps(record) + "\n")
            logger.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in batch.metrics.items()))
            history.append(record)
    logger.info("run directory: %s", out_dir)
    return history


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="quickstart")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.temperature=0.7")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [quickstart pid=%(process)d] %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        run(args.recipe, args.overrides, args.steps)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
