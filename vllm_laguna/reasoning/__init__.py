"""The ``laguna`` reasoning parser (registered lazily by :func:`vllm_laguna.register`)."""
