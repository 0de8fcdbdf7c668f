"""Shared test helpers: tiny runs and rewards, random-weight HF checkpoints and tokenizers, the rank
program of the distributed tests, the memory probe, the Triton interpreter patch."""
