"""OpenAI-compatible HTTP serving of one base model and many adapters (`posttrain serve`)."""
