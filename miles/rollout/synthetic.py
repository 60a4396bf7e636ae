"""Synthetic, verifiable prompt sets generated offline (the quickstart and tests use them).

    python -m miles.rollout.synthetic OUT.jsonl [--task arithmetic] [--num 256] [--seed 0]

Tasks (each row: {"prompt": str, "label": str, "metadata": {...}}):
- arithmetic: "What is A + B? Answer:" with label str(A + B), A, B in [0, max_operand].
- repeat: "Repeat: W" with label W, W one word from a small fixed vocabulary.
- repeat-sft: "Repeat: W" with response " V", V drawn independently of W: a format-only SFT
  warm-up set (answer with one vocabulary word, then stop) that leaves the copying itself to RL.
Generation is a pure function of (task, num, seed), so the same command always writes the same file.
"""

import argparse
import json
import random
import sys
from pathlib import Path

from miles.atomic_file import atomic_write_text

REPEAT_WORDS = ("yes", "no", "hello", "world", "one", "two", "three", "answer")


def arithmetic_rows(num: int, seed: int, max_operand: int = 20) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        rows.append({"prompt": f"What is {a} + {b}? Answer:", "label": str(a + b), "metadata": {"a": a, "b": b}})
    return rows


def repeat_rows(num: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(num):
        word = rng.choice(REPEAT_WORDS)
        rows.append({"prompt": f"Repeat: {word}", "label": word, "metadata": {}})
    return rows


def repeat_sft_rows(num: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"Repeat: {rng.choice(REPEAT_WORDS)}", "response": f" {rng.choice(REPEAT_WORDS)}"}
            for _ in range(num)]


TASKS = {"arithmetic": arithmetic_rows, "repeat": repeat_rows, "repeat-sft": repeat_sft_rows}


def write_jsonl(rows: list[dict], out: Path) -> Path:
    """Write rows atomically (temp file + rename), so a crash never leaves half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out, "".join(json.dumps(row) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--task", choices=sorted(TASKS), default="arithmetic")
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    write_jsonl(TASKS[args.task](args.num, args.seed), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
