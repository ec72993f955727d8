"""Test helpers that ship with the package (the stand-in accelerator for GPU-less CI)."""
