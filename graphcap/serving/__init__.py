"""`graphcap serve`: an OpenAI-compatible HTTP server over one `LLM`, whose engine loop runs in its own thread
(async_engine.py), and `graphcap serve-bench`, a load generator for it (bench.py)."""
