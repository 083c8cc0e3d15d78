"""The agent: runs beside Ollama on a GPU host and streams job answers to the server."""
