"""Engine: requests, scheduler, sampler, tokenizer and the offline `LLM` API."""
