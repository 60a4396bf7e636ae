"""`JsonlPromptSource`: prompts from a JSONL file, in a seeded per-epoch order, resumable.

Each line is one JSON object: {"prompt": "..." | [{"role": ..., "content": ...}, ...],
"label": ..., "metadata": {...}} (the prompt and label keys are configurable; label and metadata may
be absent). The whole file is checked when the source is built, so a bad row fails the run at
start-up with its file:line, not hours later. Tokenisation happens when a prompt is handed out.
"""

import json
import logging
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from miles.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptItem:
    """One prompt, ready for the rollout client."""

    group_id: int
    """Global, increasing id of the prompt group (stable across resume)."""
    prompt: Any
    """The prompt as in the file (string or chat messages)."""
    prompt_tokens: list[int]
    """Token ids sent to the engine."""
    label: Any = None
    """Reference answer for the reward (None when the row has none)."""
    metadata: dict = field(default_factory=dict)
    """The row's "metadata" object, if any."""


@dataclass(frozen=True)
class _Row:
    prompt: Any
    label: Any
    metadata: dict


class JsonlPromptSource:
    """Validated JSONL prompts; `next_prompts(n)` walks a per-epoch shuffled order and wraps around."""

    def __init__(
        self, path: str | os.PathLike, *, tokenizer, prompt_key: str = "prompt", label_key: str = "label",
        apply_chat_template: bool = False, shuffle: bool = True, seed: int = 0,
    ):
        self.path = str(path)
        self.tokenizer = tokenizer
        self.apply_chat_template = apply_chat_template
        self.shuffle = shuffle
        self.seed = seed
        self._rows = _read_rows(self.path, prompt_key, label_key, apply_chat_template)
        self._epoch, self._cursor, self._next_group_id = 0, 0, 0
        self._order = self._order_for(0)
        logger.info("%s: %d prompts", self.path, len(self._rows))

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def epoch(self) -> int:
        return self._epoch

    def _order_for(self, epoch: int) -> list[int]:
        order = list(range(len(self._rows)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def next_prompts(self, num_prompts: int) -> list[PromptItem]:
        """The next num_prompts prompts; crosses into the next epoch (reshuffled) when one runs out."""
        items = []
        for _ in range(num_prompts):
            if self._cursor == len(self._rows):
                self._epoch, self._cursor = self._epoch + 1, 0
                self._order = self._order_for(self._epoch)
            row = self._rows[self._order[self._cursor]]
            items.append(PromptItem(self._next_group_id, row.prompt, self.tokenize(row.prompt), row.label, row.metadata))
            self._cursor += 1
            self._next_group_id += 1
        return items

    def tokenize(self, prompt: str | list[dict]) -> list[int]:
        """Prompt → token ids: chat template with the generation prompt, or plain encode."""
        if not self.apply_chat_template:
            return list(self.tokenizer.encode(prompt))
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding by default
            ids = ids["input_ids"]
        return list(ids)

    def state_dict(self) -> dict:
        """Position in the data (for checkpoints)."""
        return {"epoch": self._epoch, "cursor": self._cursor, "next_group_id": self._next_group_id, "num_rows": len(self._rows)}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state_dict()` was taken. The file must have the same number of rows."""
        if state["num_rows"] != len(self._rows):
            raise ConfigError(
                f"{self.path} has {len(self._rows)} rows but the checkpoint was taken with {state['num_rows']}; "
                "resume with the same data file"
            )
        if not 0 <= state["cursor"] <= len(self._rows):
            raise ConfigError(f"data source state has cursor {state['cursor']} outside 0..{len(self._rows)}")
        self._epoch, self._cursor, self._next_group_id = state["epoch"], state["cursor"], state["next_group_id"]
        self._order = self._order_for(self._epoch)


def _read_rows(path: str, prompt_key: str, label_key: str, apply_chat_template: bool) -> list[_Row]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as exc:
        raise ConfigError(f"cannot read prompt data {path}: {exc}") from exc
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
        if not isinstance(obj, dict):
            raise ConfigError(f"{where}: expected a JSON object per line, got {type(obj).__name__}")
        if prompt_key not in obj:
            raise ConfigError(
                f"{where}: row has no prompt key {prompt_key!r} (rollout.prompt_key); its keys are {sorted(obj)}"
            )
        prompt = obj[prompt_key]
        _check_prompt(prompt, where, prompt_key, apply_chat_template)
        metadata = obj.get("metadata", {})
        if not isinstance(metadata, dict):
            raise ConfigError(f"{where}: \"metadata\" must be a JSON object, got {type(metadata).__name__}")
        rows.append(_Row(prompt, obj.get(label_key), metadata))
    if not rows:
        raise ConfigError(f"prompt data {path} has no rows")
    return rows


def _check_prompt(prompt: Any, where: str, prompt_key: str, apply_chat_template: bool) -> None:
    if isinstance(prompt, str):
        return
    is_chat = isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in prompt
    )
    if not is_chat:
        raise ConfigError(
            f"{where}: {prompt_key!r} must be a string or a non-empty list of {{\"role\", \"content\"}} messages, "
            f"got {json.dumps(prompt)[:100]}"
        )
    if not apply_chat_template:
        raise ConfigError(f"{where}: {prompt_key!r} is a chat message list; set rollout.apply_chat_template=true")
