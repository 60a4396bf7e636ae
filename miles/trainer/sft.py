"""Supervised warm-up before RL (optional): teach the answer format on (prompt, response) pairs.

    sft:
      data_path: .cache/data/quickstart-sft.jsonl   # rows {"prompt": str, "response": str}
      steps: 40
      batch_size: 32
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path

from miles.errors import ConfigError
from miles.rollout.sample import Sample


@dataclass(frozen=True)
class SftConfig:
    """The supervised warm-up stage; steps = 0 turns it off."""

    data_path: str = ""
    """JSONL of {prompt_key: str, response_key: str} rows."""
    prompt_key: str = "prompt"
    """Key of the prompt text."""
    response_key: str = "response"
    """Key of the target response text (the tokenizer's EOS is appended)."""
    steps: int = 0
    """Optimizer steps of warm-up (0 = no warm-up)."""
    batch_size: int = 32
    """Samples per warm-up step."""
    lr: float = 1e-3
    """Learning rate during warm-up (the RL lr applies afterwards)."""

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("sft.steps must be >= 0, sft.batch_size >= 1 and sft.lr > 0")
        if self.steps and not self.data_path:
            raise ConfigError("sft.steps > 0 needs sft.data_path (a JSONL of prompt/response rows)")


def load_sft_samples(cfg: SftConfig, tokenizer) -> list[Sample]:
    """Read and tokenize every row; a bad line is a ConfigError naming file:line."""
    path = Path(cfg.data_path)
    if not path.is_file():
        raise ConfigError(f"sft.data_path={cfg.data_path!r} does not exist")
    samples = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
        missing = [k for k in (cfg.prompt_key, cfg.response_key) if not isinstance(row, dict) or k not in row]
        if missing:
            raise ConfigError(f"{path}:{lineno}: missing key(s) {missing}")
        prompt_ids = tokenizer(row[cfg.prompt_key])["input_ids"]
        response_ids = tokenizer(row[cfg.response_key])["input_ids"] + [tokenizer.eos_token_id]
        samples.append(Sample(group_id=len(samples), index=0, prompt_tokens=prompt_ids,
                              response_tokens=response_ids, loss_mask=[1] * len(response_ids)))
    if not samples:
        raise ConfigError(f"{path}: no rows")
    return samples


def sft_batches(samples: list[Sample], cfg: SftConfig, seed: int):
    """Yield cfg.steps batches of cfg.batch_size samples, reshuffled each pass (deterministic)."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(cfg.steps):
        batch = []
        while len(batch) < cfg.batch_size:
            if not order:
                order = list(range(len(samples)))
                rng.shuffle(order)
            batch.append(samples[order.pop()])
        yield batch
