"""Lantern's benchmark harness: Lantern vs llama.cpp vs transformers on one GGUF (run `python -m bench`).

Run on demand, never in CI. See bench/README.md.
"""
