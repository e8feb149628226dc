"""`graphcap serve`: an OpenAI-compatible HTTP server over one `LLM`, whose engine runs in its own thread (a
decoder's loop in async_engine.py, an encoder's batching in embed_engine.py), and `graphcap bench serve`, a load
generator for it (bench.py)."""
