"""Tools a chat model can call (MOSS / OpenAI style): registry, agent loop, tool-call parsing, calculator, solver, search."""
