"""Token ids of Video-CoM conversations in Qwen's chat format, built turn by turn (token in, token out).

The rollout engine appends turns to live sequences and SFT tokenizes whole conversations; both call this
module, so the ids a rollout produced are exactly the ids training sees (spec section 7, defect 8: the
reference decoded generated text and re-tokenized it for the loss).

Layout (spec section 3 and 5):
  <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n
  <|im_start|>user\n{<|vision_start|><|video_pad|>*n<|vision_end|>}...{text}<|im_end|>\n
  <|im_start|>assistant\n{model text}<|im_end|>\n
  <|im_start|>user\n{media}{reply text}<|im_end|>\n<|im_start|>assistant\n ...
Every turn starts at a special token, so tokenizing turn by turn gives the same ids as tokenizing the
whole rendered string (tests/test_chat.py checks it against `apply_chat_template` + the tokenizer).
"""
from __future__ import annotations

from dataclasses import dataclass

SYSTEM_PROMPT = "You are a helpful assistant."


def num_media_tokens(grid_thw, spatial_merge: int = 2) -> int:
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // (spatial_merge * spatial_merge)


@dataclass
class ChatTokens:
    tokenizer: object
    system_prompt: str = SYSTEM_PROMPT

    def __post_init__(self):
        c = self.tokenizer.convert_tokens_to_ids
        self.im_start, self.im_end = c("<|im_start|>"), c("<|im_end|>")
        self.vision_start, self.vision_end = c("<|vision_start|>"), c("<|vision_end|>")
        self.image_pad, self.video_pad = c("<|image_pad|>"), c("<|video_pad|>")
        self.newline = self.encode("\n")
        self._role = {r: [self.im_start, *self.encode(f"{r}\n")] for r in ("system", "user", "assistant")}
        self.generation_prompt = list(self._role["assistant"])
        # transformers' decode of a fast tokenizer is its Rust decoder plus Python layers (~50 us a call on a
        # 2-core EPYC; the engine decodes each round's text): the decoder directly, where that is all it does
        fast = getattr(self.tokenizer, "_tokenizer", None)
        self._fast_decode = (fast.decode if fast is not None and hasattr(fast, "decode")
                             and not getattr(self.tokenizer, "clean_up_tokenization_spaces", False) else None)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def decode(self, ids) -> str:
        if self._fast_decode is not None:   # ids: a list, or a tensor / array (as transformers' decode takes)
            ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
            return self._fast_decode(ids, skip_special_tokens=False)
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def media(self, kind: str, n_tokens: int) -> list[int]:
        pad = self.video_pad if kind == "video" else self.image_pad
        return [self.vision_start, *([pad] * n_tokens), self.vision_end]

    def system(self) -> list[int]:
        return [*self._role["system"], *self.encode(self.system_prompt), self.im_end, *self.newline]

    def user(self, text: str, media: list[tuple[str, int]] = (), *, generation_prompt: bool = True) -> list[int]:
        """A user turn: media items (kind, n_tokens) first, then text; then the assistant header."""
        ids = list(self._role["user"])
        for kind, n in media:
            ids += self.media(kind, n)
        ids += [*self.encode(text), self.im_end, *self.newline]
        return ids + self.generation_prompt if generation_prompt else ids

    def assistant(self, text: str) -> list[int]:
        """An assistant turn's content + <|im_end|>\\n (the part SFT trains on; header excluded)."""
        return [*self.encode(text), self.im_end, *self.newline]

    def prompt(self, question: str, media: list[tuple[str, int]]) -> list[int]:
        return self.system() + self.user(question, media)

    def observation(self, text: str, media: list[tuple[str, int]]) -> list[int]:
        """Ids appended after a generated round that ended in <|im_end|>: newline, user turn, assistant header."""
        return [*self.newline, *self.user(text, media)]
