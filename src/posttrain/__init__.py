"""posttrain: post-training for language models, end to end."""

import os

# Before anything can import transformers or huggingface_hub (they read these once, at import): a
# missing local file must fail, never reach for a hub. A user who sets them otherwise asked to.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"
