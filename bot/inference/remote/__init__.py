"""Generation on inference servers (llama-server, OpenAI-compatible) behind the same fair Engine."""
