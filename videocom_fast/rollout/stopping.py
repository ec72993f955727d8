"""When a generated round ends (shared by the engine and the naive reference loop in bench/).

A round ends at the first of:
1. a sampled <|im_end|> (the model closed its turn: the token is part of the round, generated);
2. a completed action line: the round text holds an action (tool call or FINAL_ANSWER) and a line break
   follows it. A line must have ENDED because `= 1` may still grow into `= 12` and `FINAL_ANSWER: B.`
   into `FINAL_ANSWER: B. blue`. The engine then injects <|im_end|> (not generated) so the sequence keeps
   Qwen's turn format;
3. the per-round token limit (max_new_tokens); <|im_end|> is injected as in 2.
No round is ever padded or added after the episode ended (spec section 7, defect 10).

Only a token whose text holds a line break can complete an action line, and the text before a line break
never changes afterwards, so checking at line-break tokens equals checking after every token.
"""
from __future__ import annotations

from ..protocol import parse_actions


def has_line_break(piece: str) -> bool:
    return "\n" in piece or "\r" in piece


def action_line_done(text: str) -> bool:
    """True when some action of `text` is followed by a line break (its line is complete)."""
    for a in parse_actions(text):
        rest = text[a.end:]
        if "\n" in rest or "\r" in rest:
            return True
    return False


def has_answer(text: str) -> bool:
    return any(a.kind == "answer" for a in parse_actions(text))
