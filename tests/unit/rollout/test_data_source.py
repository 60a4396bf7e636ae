"""JsonlPromptSource: validation with file:line, tokenisation, deterministic order, resume."""

import json

import pytest
from transformers import AutoTokenizer

from miles.errors import ConfigError
from miles.rollout.data_source import JsonlPromptSource


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines))
    return path


def rows(n):
    return [{"prompt": f"what is {i} + {i}", "label": str(2 * i)} for i in range(n)]


def test_malformed_line_names_file_and_line(tmp_path, tokenizer):
    path = write(tmp_path, [rows(1)[0], '{"prompt": "x", "label": }\n', rows(1)[0]])
    with pytest.raises(ConfigError) as err:
        JsonlPromptSource(path, tokenizer=tokenizer)
    assert f"{path}:2: invalid JSON: Expecting value (column 26)" in str(err.value)


def test_missing_prompt_key_names_line_and_keys(tmp_path, tokenizer):
    path = write(tmp_path, [*rows(3), "\n", {"question": "hi", "label": "1"}])
    with pytest.raises(ConfigError) as err:
        JsonlPromptSource(path, tokenizer=tokenizer)
    msg = str(err.value)
    assert f"{path}:5:" in msg and "'prompt'" in msg and "['label', 'question']" in msg
    # The configured key is what is looked for.
    src = JsonlPromptSource(write(tmp_path, [{"question": "hi"}], "q.jsonl"), tokenizer=tokenizer, prompt_key="question")
    assert src.next_prompts(1)[0].prompt == "hi"


@pytest.mark.parametrize("line, needle", [
    ("[1, 2]\n", "expected a JSON object per line, got list"),
    ('{"prompt": 5}\n', "must be a string or a non-empty list"),
    ('{"prompt": "x", "metadata": 3}\n', '"metadata" must be a JSON object'),
])
def test_bad_rows(tmp_path, tokenizer, line, needle):
    path = write(tmp_path, [rows(1)[0], line])
    with pytest.raises(ConfigError, match=needle) as err:
        JsonlPromptSource(path, tokenizer=tokenizer)
    assert f"{path}:2:" in str(err.value)


def test_empty_and_missing_file(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="has no rows"):
        JsonlPromptSource(write(tmp_path, ["\n", "  \n"]), tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="cannot read prompt data"):
        JsonlPromptSource(tmp_path / "absent.jsonl", tokenizer=tokenizer)


def test_chat_prompts_need_chat_template(tmp_path, tokenizer):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 1 + 2"}]
    path = write(tmp_path, [{"prompt": chat, "label": "3", "metadata": {"src": "t"}}])
    with pytest.raises(ConfigError, match=r":1: 'prompt' is a chat message list; set rollout.apply_chat_template=true"):
        JsonlPromptSource(path, tokenizer=tokenizer)
    item = JsonlPromptSource(path, tokenizer=tokenizer, apply_chat_template=True).next_prompts(1)[0]
    text = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat is 1 + 2<|im_end|>\n<|im_start|>assistant\n"
    assert item.prompt_tokens == tokenizer.encode(text)
    assert tokenizer.decode(item.prompt_tokens) == text
    assert (item.prompt, item.label, item.metadata) == (chat, "3", {"src": "t"})


def test_string_prompts(tmp_path, tokenizer):
    path = write(tmp_path, [{"prompt": "what is 1 + 2"}])
    plain = JsonlPromptSource(path, tokenizer=tokenizer, shuffle=False).next_prompts(1)[0]
    assert plain.prompt_tokens == tokenizer.encode("what is 1 + 2") and plain.label is None
    wrapped = JsonlPromptSource(path, tokenizer=tokenizer, apply_chat_template=True).next_prompts(1)[0]
    assert tokenizer.decode(wrapped.prompt_tokens) == "<|im_start|>user\nwhat is 1 + 2<|im_end|>\n<|im_start|>assistant\n"


def test_epochs_shuffle_deterministically_and_wrap(tmp_path, tokenizer):
    path = write(tmp_path, rows(5))
    a = JsonlPromptSource(path, tokenizer=tokenizer, seed=3)
    b = JsonlPromptSource(path, tokenizer=tokenizer, seed=3)
    got = [p.label for p in a.next_prompts(7)] + [p.label for p in a.next_prompts(8)]
    assert got == [p.label for p in b.next_prompts(15)]
    assert [p.group_id for p in b.next_prompts(2)] == [15, 16]
    epochs = [got[0:5], got[5:10], got[10:15]]
    assert all(sorted(e, key=int) == ["0", "2", "4", "6", "8"] for e in epochs)  # each epoch is a permutation
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled per epoch (seed + epoch)
    assert a.epoch == 2
    other = JsonlPromptSource(path, tokenizer=tokenizer, seed=4)
    assert [p.label for p in other.next_prompts(15)] != got
    ordered = JsonlPromptSource(path, tokenizer=tokenizer, shuffle=False)
    assert [p.label for p in ordered.next_prompts(7)] == ["0", "2", "4", "6", "8", "0", "2"]


def test_state_dict_resume(tmp_path, tokenizer):
    path = write(tmp_path, rows(4))
    full = JsonlPromptSource(path, tokenizer=tokenizer, seed=1)
    expected = full.next_prompts(11)
    first = JsonlPromptSource(path, tokenizer=tokenizer, seed=1)
    head = first.next_prompts(6)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    assert state == {"epoch": 1, "cursor": 2, "next_group_id": 6, "num_rows": 4}
    resumed = JsonlPromptSource(path, tokenizer=tokenizer, seed=1)
    resumed.load_state_dict(state)
    assert head + resumed.next_prompts(5) == expected
    with pytest.raises(ConfigError, match="has 3 rows but the checkpoint was taken with 4"):
        JsonlPromptSource(write(tmp_path, rows(3), "short.jsonl"), tokenizer=tokenizer).load_state_dict(state)
