"""One place per model where a Hugging Face config is read, checked and resolved.

Each module turns whatever form a checkpoint's ``config.json`` takes into a frozen
``*Arch`` dataclass that the model code reads; every quirk is handled here, once.
"""

from vllm_laguna.configs.errors import ConfigError

__all__ = ["ConfigError"]
