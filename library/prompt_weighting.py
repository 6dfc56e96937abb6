"""The one A1111-compatible prompt weight parser: `(word)`, `[word]`, `(word:1.3)`.

Used by sample generation, gen_img and `--weighted_captions`, so all three read a prompt
the same way. Semantics (SPEC 5.2): `(x)` multiplies the weight of x by 1.1, `[x]` by
1/1.1, `(x:w)` by w; nesting multiplies; a bracket left open applies to the end of the
prompt; `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal characters; adjacent pieces with
equal weight are merged.
"""
from __future__ import annotations

import re

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1

# One alternative per kind of piece, tried in this order at every position. A lone backslash
# is its own piece and (as in A1111) contributes nothing; a ":" that does not start an
# explicit weight followed by ")" is plain text.
_PIECE_PATTERN = re.compile(
    r"""
    (?P<escaped>\\[()\[\]\\])
  | (?P<backslash>\\)
  | (?P<open_round>\()
  | (?P<open_square>\[)
  | :(?P<explicit_weight>[+-]?[.\d]+)\)
  | (?P<close_round>\))
  | (?P<close_square>\])
  | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.VERBOSE,
)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split `text` into (text, weight) pieces following A1111's attention syntax.

    Always returns at least one piece (`[("", 1.0)]` for an empty prompt).
    """
    # Pieces are kept as mutable [text, weight] pairs so that a closing bracket can scale
    # everything appended since its opening bracket.
    pieces: list[list] = []
    open_rounds: list[int] = []
    open_squares: list[int] = []

    def scale_from(start: int, multiplier: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= multiplier

    for match in _PIECE_PATTERN.finditer(text):
        kind = match.lastgroup
        if kind == "escaped":
            pieces.append([match.group(0)[1], 1.0])
        elif kind == "backslash":
            pieces.append(["", 1.0])
        elif kind == "open_round":
            open_rounds.append(len(pieces))
        elif kind == "open_square":
            open_squares.append(len(pieces))
        elif kind == "explicit_weight" and open_rounds and _is_number(match.group("explicit_weight")):
            scale_from(open_rounds.pop(), float(match.group("explicit_weight")))
        elif kind == "close_round" and open_rounds:
            scale_from(open_rounds.pop(), ROUND_BRACKET_MULTIPLIER)
        elif kind == "close_square" and open_squares:
            scale_from(open_squares.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            # plain text, or a closing bracket / weight with nothing open: kept literally
            pieces.append([match.group(0), 1.0])

    # unclosed brackets reach to the end of the prompt
    for start in open_rounds:
        scale_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in open_squares:
        scale_from(start, SQUARE_BRACKET_MULTIPLIER)

    merged: list[tuple[str, float]] = []
    for piece_text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece_text, weight)
        else:
            merged.append((piece_text, weight))
    return merged or [("", 1.0)]


def _is_number(text: str) -> bool:
    # "[+-]?[.\d]+" also matches "." or "1.2.3"; those stay literal text instead of crashing
    try:
        float(text)
    except ValueError:
        return False
    return True
