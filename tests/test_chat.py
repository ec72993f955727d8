"""Turn-by-turn token ids equal the processor's own tokenization of the rendered conversation."""
import pytest

from videocom_fast.chat import ChatTokens


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from videocom_fast.models import build_processor, build_tokenizer
    return build_processor(build_tokenizer())


def test_turns_equal_chat_template(processor):
    tok = processor.tokenizer
    chat = ChatTokens(tok)
    q = "Which letter does the small object show? Options: A. K, B. 7, C. Q, D. 2"
    a1 = "The object appears early. FIND_SEGMENT(small object) = [2]"
    r1 = "Continue solving the question after rewatching the selected segment."
    a2 = "I see it. FINAL_ANSWER: B. 7"
    messages = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": q}]},
        {"role": "assistant", "content": [{"type": "text", "text": a1}]},
        {"role": "user", "content": [{"type": "video"}, {"type": "image"}, {"type": "text", "text": r1}]},
        {"role": "assistant", "content": [{"type": "text", "text": a2}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    # expand each pad to a known count as the processor does
    n_v1, n_v2, n_i = 12, 8, 4
    text = text.replace("<|video_pad|>", "<|video_pad|>" * n_v1, 1)
    head, tail = text.split("<|video_pad|>" * n_v1, 1)
    tail = tail.replace("<|video_pad|>", "<|video_pad|>" * n_v2, 1).replace("<|image_pad|>", "<|image_pad|>" * n_i)
    expected = tok(head + "<|video_pad|>" * n_v1 + tail, add_special_tokens=False)["input_ids"]

    ids = chat.prompt(q, [("video", n_v1)])
    ids += chat.assistant(a1)[:-len(chat.newline)]          # the engine stops at <|im_end|> ...
    ids += chat.observation(r1, [("video", n_v2), ("image", n_i)])  # ... and appends "\n" + the user turn
    ids += chat.assistant(a2)
    assert ids == expected


def test_media_block_counts(processor):
    chat = ChatTokens(processor.tokenizer)
    ids = chat.user("x", [("image", 3), ("video", 5)], generation_prompt=False)
    assert ids.count(chat.image_pad) == 3 and ids.count(chat.video_pad) == 5
    assert ids.count(chat.vision_start) == 2 and ids.count(chat.vision_end) == 2


def test_decode_equals_the_tokenizers_decode(processor):
    """ChatTokens.decode calls the Rust decoder directly: the same text as transformers' decode, on random ids
    (special tokens, split multi-byte characters, empty) and on real text."""
    import random

    import numpy as np
    import torch
    tok = processor.tokenizer
    chat = ChatTokens(tok)
    assert chat._fast_decode is not None   # the fast path is what this test checks
    rng = random.Random(0)
    V = len(tok)
    cases = [[], [chat.im_end], chat.encode("FIND_FRAME(tag) = [3]\nnaïve 東京 🙂")]
    cases += [[rng.randrange(V) for _ in range(rng.randint(1, 40))] for _ in range(300)]
    for ids in cases:
        assert chat.decode(ids) == tok.decode(ids, skip_special_tokens=False), ids
    ids = cases[2]
    want = tok.decode(ids, skip_special_tokens=False)
    assert chat.decode(torch.tensor(ids)) == chat.decode(np.array(ids)) == want
