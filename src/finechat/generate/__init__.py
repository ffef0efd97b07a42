"""Generation: settings, sampling, the chat engine (chat / stream_chat), the fast path, batching, benchmarks."""
