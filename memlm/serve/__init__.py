"""`memlm serve`: an OpenAI-compatible completions server whose sessions keep their memory.

sessions.py: the session store (LRU, capped in number and bytes); engine.py: generation with a
session's State; app.py: the HTTP application (FastAPI, run by uvicorn). Needs the `serve` extra.
"""
