"""Text in and out of a model, knowing no model: the tokenizer, chat templates, tool-call formats, the
thinking split, and constraints described as text (JSON schemas, regexes, grammars)."""
