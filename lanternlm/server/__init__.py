"""The OpenAI-compatible HTTP server and its web page."""
