"""A1111 attention syntax: expectations derived by hand from SPEC 5.2."""
from __future__ import annotations

import pytest

from library.prompt_weighting import parse_prompt_attention

W = 1.1  # one round bracket
S = 1 / 1.1  # one square bracket

CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("", [("", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", W), (" word", 1.0)]),
    ("a [quiet] word", [("a ", 1.0), ("quiet", S), (" word", 1.0)]),
    ("(x:1.3)", [("x", 1.3)]),
    ("(x:0.5) y", [("x", 0.5), (" y", 1.0)]),
    ("(x:-1)", [("x", -1.0)]),
    ("((x))", [("x", W * W)]),
    ("(((x)))", [("x", W * W * W)]),
    ("[[x]]", [("x", S * S)]),
    ("([x])", [("x", W * S)]),
    ("((x:1.3))", [("x", 1.3 * W)]),
    ("(a (b) c)", [("a ", W), ("b", W * W), (" c", W)]),
    ("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 2 * 0.5), (" c", 0.5)]),
    # unclosed brackets apply to the end
    ("(unbalanced", [("unbalanced", W)]),
    ("a (b c", [("a ", 1.0), ("b c", W)]),
    ("a [b (c", [("a ", 1.0), ("b ", S), ("c", W * S)]),
    # closing brackets with nothing open are literal text
    ("a) b]", [("a) b]", 1.0)]),
    ("x:1.3)", [("x:1.3)", 1.0)]),
    # escapes
    (r"\(literal\]", [("(literal]", 1.0)]),
    (r"\[a\) \\", [("[a) \\", 1.0)]),
    (r"(\(x\))", [("(x)", W)]),
    # a lone backslash contributes nothing (A1111 behaviour)
    ("a\\b", [("ab", 1.0)]),
    # a colon that is not an explicit weight is text
    ("time: 12", [("time: 12", 1.0)]),
    ("(x:abc)", [("x:abc", W)]),
    # an unparsable weight stays literal and the bracket stays open
    ("(x:.)", [("x:.)", W)]),
    # equal-weight neighbours merge
    ("(unnecessary)(parens)", [("unnecessaryparens", W)]),
    ("(a)[b](c)", [("a", W), ("b", S), ("c", W)]),
    ("(a:1.1)(b)", [("ab", W)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.3 * W * W),
            (" ", W),
            ("on", 1.0),  # [on] inside one open "(" : 1.1 / 1.1
            (" a ", W),
            ("hill", 0.5 * W),
            (", sun, ", W),
            ("sky", W**4),
            (".", W),
        ],
    ),
]


@pytest.mark.parametrize("prompt,expected", CASES)
def test_parse_prompt_attention(prompt, expected):
    parsed = parse_prompt_attention(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in expected]
    for (_, weight), (_, expected_weight) in zip(parsed, expected):
        assert weight == pytest.approx(expected_weight, rel=1e-9)


def test_text_is_preserved_without_brackets():
    prompt = "masterpiece, best quality, 1girl, solo: looking at viewer!"
    assert parse_prompt_attention(prompt) == [(prompt, 1.0)]
