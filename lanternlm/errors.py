"""Lantern's exception types: one clear message, naming the file or value at fault."""


class LanternError(Exception):
    """Base class for errors Lantern reports to the user as one line."""


class ModelFileError(LanternError):
    """A model file is missing, unreadable, malformed or unsupported.

    The message always names the file and the problem, e.g.
    ``model.gguf: tensor 'blk.0.attn_q.weight' data ends at byte 123456 past the end of the file (98765)``.
    """

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class TemplateError(LanternError):
    """A chat template is missing, invalid, or raised an exception while rendering."""
