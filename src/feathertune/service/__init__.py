"""The OpenAI-compatible fine-tuning service (`feathertune serve`)."""
