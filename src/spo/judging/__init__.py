"""Pairwise judging of responses: versioned judge prompts, a SQLite cache of paid-for judgments,
and an OpenAI-compatible LLM judge with retries, bounded concurrency and a spending budget."""
