"""Fuzzers for Lantern's untrusted-input parsers: GGUF files, safetensors headers and chat templates.

`python -m fuzz TARGET --minutes N` runs one on demand (see fuzz/README.md); tests/test_fuzz_smoke.py runs each
for a few dozen fixed examples in CI. The targets and input generators live in `fuzz.targets`.
"""
