"""seed_sweep.py with the LLM's heads narrowed at the same width (session 17): `--head-dim 16` builds
hidden / 16 query heads and hidden / 32 KV heads with mrope_section [2, 3, 3] (half of [4, 6, 6]); the other
arguments are seed_sweep.py's.

    python docs/vision_demo_data/head_dim_sweep.py --head-dim 16 --seed 2 --tag-pos-weight 25 \
        --out /tmp/hd16_s2
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    hd = 32
    if "--head-dim" in sys.argv:
        i = sys.argv.index("--head-dim")
        hd = int(sys.argv[i + 1])
        del sys.argv[i:i + 2]
    from videocom_fast import models
    if hd != models.HEAD_DIM:
        sections = {16: [2, 3, 3]}
        if hd not in sections:
            raise SystemExit(f"--head-dim: 32 (the default) or 16, got {hd}")
        hidden = models.TINY_TEXT["hidden_size"]
        models.HEAD_DIM = hd
        rope = dict(models.TINY_TEXT["rope_parameters"], mrope_section=sections[hd])
        models.TINY_TEXT = dict(models.TINY_TEXT, num_attention_heads=hidden // hd,
                                num_key_value_heads=hidden // (2 * hd), rope_parameters=rope)
        text_sizes = models.text_sizes

        def narrow(**sizes):
            h = sizes.get("hidden_size", hidden)
            sizes.setdefault("num_attention_heads", h // hd)
            sizes.setdefault("num_key_value_heads", h // (2 * hd))
            return text_sizes(**sizes)
        models.text_sizes = narrow
    import seed_sweep
    seed_sweep.main()


if __name__ == "__main__":
    main()
