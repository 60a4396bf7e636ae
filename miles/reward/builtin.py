"""Built-in reward functions (RewardFn): name them in recipes as "miles.reward.builtin:<name>".

- exact_match: 1.0 when response and label agree after trimming and collapsing whitespace.
- math_boxed:  1.0 when the last \\boxed{...} in the response equals the label (numerically when both
               are numbers, so "42" == "42.0" == "84/2").
- f1:          SQuAD token-level F1 of the response against the label, in [0, 1].

A missing label (None) scores 0.0 everywhere. Labels that are JSON numbers are compared as text.
"""

import re
import string
from collections import Counter
from fractions import Fraction

from miles.reward.types import RewardInput

_BOXED = "\\boxed{"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _collapse(text: str) -> str:
    return " ".join(text.split())


def exact_match(inp: RewardInput) -> float:
    """1.0 if the response equals the label after strip and whitespace collapsing, else 0.0."""
    if inp.label is None:
        return 0.0
    return 1.0 if _collapse(inp.response) == _collapse(str(inp.label)) else 0.0


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} in text, nested braces included; None if absent or unclosed."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(_BOXED)
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
    return None


def _normalize_answer(answer: str) -> str:
    answer = answer.replace("$", "")
    answer = "".join(answer.split())
    return answer.rstrip(".")


def _as_number(answer: str) -> Fraction | None:
    try:
        return Fraction(answer)  # exact: "42", "42.0", "-1.5", "1e3", "3/4"
    except (ValueError, ZeroDivisionError):
        return None


def math_boxed(inp: RewardInput) -> float:
    """1.0 if the last \\boxed{} answer equals the label (spaces, $ and a trailing '.' ignored;
    numbers compared by value), else 0.0. No box, or no label, scores 0.0."""
    if inp.label is None:
        return 0.0
    boxed = last_boxed(inp.response)
    if boxed is None:
        return 0.0
    got, want = _normalize_answer(boxed), _normalize_answer(str(inp.label))
    if got == want:
        return 1.0
    got_num, want_num = _as_number(got), _as_number(want)
    return 1.0 if got_num is not None and got_num == want_num else 0.0


def squad_tokens(text: str) -> list[str]:
    """SQuAD normalisation: lowercase, drop punctuation and articles (a, an, the), split on whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    return _ARTICLES.sub(" ", text).split()


def f1(inp: RewardInput) -> float:
    """Token-level F1 between response and label (SQuAD); both empty scores 1.0, one empty 0.0."""
    if inp.label is None:
        return 0.0
    pred, gold = squad_tokens(inp.response), squad_tokens(str(inp.label))
    if not pred or not gold:
        return float(pred == gold)
    num_same = sum((Counter(pred) & Counter(gold)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred), num_same / len(gold)
    return 2 * precision * recall / (precision + recall)
