"""The models: pure torch modules with Hugging Face parameter names that never open files.

The decoder still lives at lanternlm/model.py (other modules import it there); encoders and pooling are here.
"""
