"""The server's routes, one router per file: OpenAI's chat and completions, tokens and models, the service
routes (health, metrics), and Lantern's look-inside routes."""
