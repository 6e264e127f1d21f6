"""Our model classes built and loaded the way vLLM's model loader does, without an engine:
for checks of what vLLM's LoRA and EPLB machinery will find in a model (and of settings vLLM's
CPU engine refuses to run).

Use :func:`process_group` as a module-scoped fixture (import it into the test module), then
:func:`load_model`.
"""

from __future__ import annotations

import pytest
import torch

from harness import KV_CACHE_BYTES


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """One single-rank gloo group (what vLLM's worker sets up), the plugin registered, and
    torch.accelerator's cache calls made no-ops, as vLLM's CPU model runner does."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import cleanup_dist_env_and_memory, init_distributed_environment, initialize_model_parallel

    import vllm_laguna

    vllm_laguna.register()
    # start from no groups whatever ran before in this worker (engines that fail to start
    # used to leave theirs up; harness.start_engine now tears them down)
    cleanup_dist_env_and_memory()
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(1, 0, f"file://{tmp_path_factory.mktemp('dist') / 'init'}", 0, "gloo")
        initialize_model_parallel(1, 1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.accelerator, "empty_cache", lambda: None)
        yield
    cleanup_dist_env_and_memory()


def model_vllm_config(ckpt, dtype: str = "float32", **configs):
    """The ``VllmConfig`` of ``ckpt`` for a model built without an engine: 256 tokens, and the
    test engines' explicit KV-cache size, so that the start-up check does not weigh this
    machine's free memory (``startup_checks.check_cpu_kv_cache``); ``configs``: further
    sub-configs (``lora_config=...``)."""
    from vllm.config import CacheConfig, ModelConfig, VllmConfig

    return VllmConfig(
        model_config=ModelConfig(model=str(ckpt), dtype=dtype, max_model_len=256),
        cache_config=CacheConfig(kv_cache_memory_bytes=KV_CACHE_BYTES),
        **configs,
    )


def load_model(ckpt, num_redundant_experts: int | None = None, lora_config=None, dtype: str = "float32"):
    """``(model, vllm_config)`` for ``ckpt`` in ``dtype`` as vLLM's default loader builds it
    (weights loaded and processed). ``num_redundant_experts`` turns
    EPLB on, set after the config's validation (vLLM refuses EPLB on CPU); ``lora_config``
    is what ``enable_lora`` would set (the LoRA manager itself is not created)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model

    vllm_config = model_vllm_config(ckpt, dtype, lora_config=lora_config)
    if num_redundant_experts is not None:
        parallel = vllm_config.parallel_config
        parallel.enable_eplb = True
        parallel.eplb_config.num_redundant_experts = num_redundant_experts
    with set_current_vllm_config(vllm_config):
        return get_model(vllm_config=vllm_config), vllm_config
