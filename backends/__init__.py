"""Workers that run models: one skeleton (worker.py) and its engines (HuggingFace; an OpenAI-compatible API)."""
