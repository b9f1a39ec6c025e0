"""Choosing tokens and running generation: sampling stages, grammars compiled for a vocabulary, the guide
that walks a sequence through them, the one next-token path (choose.py), generation for one sequence, and
the plan that turns a chat request into a prompt and a guide."""
