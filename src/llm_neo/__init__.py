"""llm-neo: distill large language models the LLM-Neo way (LoRA student, CE + KD, merged export)."""

__version__ = "0.1.0"
