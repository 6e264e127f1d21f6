"""The ``laguna`` tool-call parser (registered lazily by :func:`vllm_laguna.register`)."""
