"""Shared pytest fixtures. The SFT helper's fixtures (a fitted tiny model, small synthesized data) live in
fixtures_sft.py; importing them here makes them available to every test file."""
from fixtures_sft import sft_tiny_model, synth_small, tiny_dir  # noqa: F401
