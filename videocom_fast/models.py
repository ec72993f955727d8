"""A tiny Qwen2.5-VL for tests and the demo: the real architecture (transformers classes), tiny sizes.

`build_tiny(out_dir, seed=0)` writes a randomly initialised Qwen2_5_VLForConditionalGeneration, a small
byte-level BPE tokenizer trained in-process (Qwen's special and chat tokens kept as single ids, digits
split one per token as Qwen does), Qwen's chat template, and a Qwen2_5_VLProcessor, so that
`from_pretrained(out_dir)` works offline for the model, the tokenizer and the processor. No download.

Sizes (about 0.6 M parameters in the LLM plus a 2-block vision tower): hidden 128, 2 layers, 4 heads of
32 (mrope_section [4, 6, 6] sums to head_dim/2), vision hidden 64, depth 2, merger out 128 = text hidden.
`build_tiny(out, hidden_size=256, num_hidden_layers=4)` makes a wider/deeper LLM (the SFT config's
`model_kwargs`): heads stay 32 wide (so the mrope_section fits), 2 query heads per KV head, MLP 2x hidden,
and the merger's output follows the text hidden size. The defaults are what every other test builds.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL's chat template, reduced to what Video-CoM uses: string or list content with image/video/text parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                  "mrope_section": [4, 6, 6]})
TINY_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
                   out_hidden_size=128, fullatt_block_indexes=[1])


def _corpus(seed: int) -> list[str]:
    """Text the tokenizer learns merges from: the protocol's vocabulary in the shapes the model emits."""
    rng = random.Random(seed)
    words = ("the a of in is to and segment frame object shows appears question answer letter digit color "
             "red green blue yellow white black purple orange small moving square circle triangle video "
             "rewatch selected zoomed region continue solving focusing choose final provided options "
             "option which what where when first then look find closer see I need let me it at top left "
             "right bottom corner center label shown on carrying character").split()
    tools = ["FIND_SEGMENT", "FIND_FRAME", "SPATIAL_ZOOM", "FINAL_ANSWER", "Segment-", "Frame-", "Options:"]
    lines = []
    for _ in range(4000):
        k = rng.randint(3, 14)
        line = " ".join(rng.choice(words) for _ in range(k))
        if rng.random() < 0.5:
            t = rng.choice(tools)
            nums = ", ".join(str(rng.randint(0, 999)) for _ in range(rng.choice([1, 1, 4])))
            line = f"{line}. {t}({rng.choice(words)} {rng.choice(words)}) = [{nums}]"
        if rng.random() < 0.2:
            line += f"\nFINAL_ANSWER: {rng.choice('ABCD')}. {rng.choice(words)}"
        lines.append(line[:1].upper() + line[1:])
    return lines


def build_tokenizer(vocab_size: int = 640, seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


TEXT_SIZE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads")
HEAD_DIM = 32     # TINY_TEXT's head width; mrope_section [4, 6, 6] sums to HEAD_DIM / 2


def text_sizes(**sizes) -> dict:
    """TINY_TEXT's size fields with `sizes` applied; heads and MLP follow hidden_size unless given."""
    unknown = sorted(set(sizes) - set(TEXT_SIZE_KEYS))
    if unknown:
        raise ValueError(f"model size: unknown keys {unknown}; known: {list(TEXT_SIZE_KEYS)}")
    for k, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{k}: expected a positive int, got {v!r}")
    out = {k: TINY_TEXT[k] for k in TEXT_SIZE_KEYS}
    hidden = sizes.get("hidden_size", out["hidden_size"])
    if hidden != out["hidden_size"]:   # derived sizes follow the width unless given explicitly
        if hidden % (2 * HEAD_DIM):
            raise ValueError(f"hidden_size: expected a multiple of {2 * HEAD_DIM}, got {hidden}")
        out.update(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=hidden // HEAD_DIM,
                   num_key_value_heads=hidden // (2 * HEAD_DIM))
    out.update(sizes)
    if out["hidden_size"] != HEAD_DIM * out["num_attention_heads"]:
        raise ValueError(f"num_attention_heads: hidden_size {out['hidden_size']} / heads "
                         f"{out['num_attention_heads']} must be {HEAD_DIM} (mrope_section {[4, 6, 6]})")
    if out["num_attention_heads"] % out["num_key_value_heads"]:
        raise ValueError(f"num_key_value_heads: {out['num_key_value_heads']} must divide "
                         f"num_attention_heads {out['num_attention_heads']}")
    return out


def tiny_config(tokenizer, **sizes):
    """The tiny Qwen2_5_VLConfig; `sizes` (TEXT_SIZE_KEYS) widen/deepen the LLM, see `text_sizes`."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(TINY_TEXT, **text_sizes(**sizes), vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(TINY_VISION, out_hidden_size=text["hidden_size"])   # the merger feeds the LLM's width
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )


def build_processor(tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor

    # Pixel limits here are the processor defaults; callers pass min/max pixels per call, as the protocol does.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=128 * 28 * 28)
    video_processor = Qwen2VLVideoProcessor(min_pixels=128 * 28 * 28, max_pixels=360 * 420)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=video_processor, chat_template=CHAT_TEMPLATE)


def build_tiny(out_dir, seed: int = 0, dtype=None, **sizes) -> Path:
    """Write a tiny random Qwen2.5-VL + tokenizer + processor to `out_dir`; returns the path.
    `sizes`: optional LLM sizes (hidden_size, num_hidden_layers, ...; see `text_sizes`)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    text_sizes(**sizes)   # a bad size fails before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed=seed)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer, **sizes))
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(out)
    build_processor(tokenizer).save_pretrained(out)
    (out / "videocom_tiny.json").write_text(json.dumps({"seed": seed, "builder": "videocom_fast.models.build_tiny",
                                                            **({"sizes": sizes} if sizes else {})}))
    return out


def load(path, dtype=None, device="cpu"):
    """(model, processor) from a directory written by build_tiny or any Qwen2.5-VL checkpoint."""
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype or torch.float32).to(device)
    processor = AutoProcessor.from_pretrained(path)
    return model.eval(), processor
