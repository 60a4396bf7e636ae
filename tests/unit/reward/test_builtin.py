"""Built-in rewards: values computed by hand."""

import pytest

from miles.reward.builtin import exact_match, f1, last_boxed, math_boxed
from miles.reward.types import RewardInput


def inp(response: str, label) -> RewardInput:
    return RewardInput(prompt="q", response=response, label=label)


@pytest.mark.parametrize("response, label, expected", [
    ("42", "42", 1.0),
    ("  hello \n  world ", "hello world", 1.0),
    ("hello  world", "hello\tworld", 1.0),
    ("Hello world", "hello world", 0.0),  # case matters
    ("42", 42, 1.0),  # JSON number label
    ("42", "43", 0.0),
    ("", "", 1.0),
    ("42", None, 0.0),
])
def test_exact_match(response, label, expected):
    assert exact_match(inp(response, label)) == expected


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{42}", "42"),
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
    ("\\boxed{{a}{b}}", "{a}{b}"),
    ("\\boxed{12", None),
    ("no box here", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("response, label, expected", [
    ("The answer is \\boxed{42}.", "42", 1.0),
    ("\\boxed{42.0}", "42", 1.0),
    ("\\boxed{ 42 }", "$42$", 1.0),
    ("\\boxed{42.}", "42", 1.0),
    ("\\boxed{84/2}", "42", 1.0),
    ("\\boxed{0.5}", "1/2", 1.0),
    ("\\boxed{-3}", -3, 1.0),
    ("\\boxed{41}", "42", 0.0),
    ("\\boxed{40} then \\boxed{42}", "42", 1.0),  # the last box counts
    ("\\boxed{42} then \\boxed{40}", "42", 0.0),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{3}", 0.0),
    ("\\boxed{x + 1}", "x+1", 1.0),
    ("42", "42", 0.0),  # no box
    ("\\boxed{42", "42", 0.0),  # unclosed box
    ("\\boxed{42}", None, 0.0),
])
def test_math_boxed(response, label, expected):
    assert math_boxed(inp(response, label)) == expected


def test_f1_fractions():
    # pred {cat, sat, on, mat} vs gold {cat, sat, on, red, mat}: 4 common, P=4/4, R=4/5, F1=8/9.
    assert f1(inp("The cat sat on the mat.", "a cat sat on the red mat")) == pytest.approx(8 / 9)
    # pred [paris, france, paris] vs gold [paris]: common 1, P=1/3, R=1, F1=2*(1/3)/(4/3)=1/2.
    assert f1(inp("Paris, France, Paris!", "paris")) == pytest.approx(0.5)
    # pred [x, y] vs gold [y, z, w]: common 1, P=1/2, R=1/3, F1=2/5.
    assert f1(inp("x y", "y z w")) == pytest.approx(0.4)


def test_f1_edges():
    assert f1(inp("Hello, World!", "hello world")) == 1.0
    assert f1(inp("nothing shared", "at all")) == 0.0
    assert f1(inp("the", "a")) == 1.0  # both normalise to no tokens
    assert f1(inp("the", "cat")) == 0.0  # one side empty
    assert f1(inp("cat", None)) == 0.0


@pytest.mark.parametrize("name, label", [("exact_match", "\\boxed{7}"), ("math_boxed", "7"), ("f1", "boxed{7}")])
def test_builtins_pass_the_plugin_loader(name, label):
    from miles.config.plugins import load_plugin
    from miles.reward.types import RewardFn

    fn = load_plugin(f"miles.reward.builtin:{name}", RewardFn, "reward.fn")
    assert fn(inp("\\boxed{7}", label)) == 1.0
    assert fn(inp("\\boxed{8}", label)) == 0.0
