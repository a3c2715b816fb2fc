"""kvctl: run several LLM engines on shared GPUs as one OpenAI-compatible service."""

__version__ = "0.1.0"
