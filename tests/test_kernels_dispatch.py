"""Dispatch of the custom ops: torch on CPU (bit for bit), opaque library ops on CUDA.

CUDA tensors are fake here (FakeTensorMode needs no GPU), which is enough to see what Dynamo
records for the CUDA path: one ``torch.ops.vllm_laguna`` node per call, shaped by its fake impl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from vllm_laguna import kernels
from vllm_laguna.kernels import dispatch
from vllm_laguna.kernels.gated_output import softplus_gate_reference
from vllm_laguna.kernels.sigmoid_topk import llama4_topk_reference, sigmoid_topk_reference


def _router_inputs(tokens=7, experts=64):
    torch.manual_seed(tokens)
    return torch.randn(tokens, experts), torch.randn(experts) * 0.1


def _gate_inputs(tokens=7, heads=4, head_dim=32, per_element=False):
    torch.manual_seed(tokens)
    attn = torch.randn(tokens, heads * head_dim, dtype=torch.bfloat16)
    return attn, torch.randn(tokens, heads * head_dim if per_element else heads, dtype=torch.bfloat16)


def test_cpu_path_is_the_reference_bit_for_bit():
    logits, bias = _router_inputs()
    for got, want in [
        (
            kernels.sigmoid_topk(logits, bias, 6, softcap=2.0, routed_scaling_factor=2.5),
            sigmoid_topk_reference(logits, bias, 6, 2.0, 2.5),
        ),
        (kernels.llama4_topk(logits, 3), llama4_topk_reference(logits, 3)),
    ]:
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for per_element in (False, True):
        attn, gate = _gate_inputs(per_element=per_element)
        assert torch.equal(kernels.softplus_gate(attn, gate, 32), softplus_gate_reference(attn, gate, 32))


def test_bad_shapes_raise_clear_errors():
    logits, _ = _router_inputs(experts=8)
    with pytest.raises(ValueError, match=r"top_k=9 must be in \[1, num_experts=8\]"):
        kernels.sigmoid_topk(logits, None, 9)
    with pytest.raises(ValueError, match="top_k=0"):
        kernels.llama4_topk(logits, 0)
    with pytest.raises(ValueError, match=r"\[tokens, experts\]"):
        kernels.sigmoid_topk(logits[None], None, 2)
    attn, gate = _gate_inputs(heads=4, head_dim=32)
    with pytest.raises(ValueError, match="head count 4 or attn width 128"):
        kernels.softplus_gate(attn, gate[:, :3], 32)
    with pytest.raises(ValueError, match=r"attn \[T, H\*D\]"):
        kernels.softplus_gate(attn, gate[:5], 32)


def test_torch_compile_traces_the_cpu_path_without_graph_breaks():
    logits, bias = _router_inputs()
    attn, gate = _gate_inputs()

    def layer(logits, bias, attn, gate):
        weights, ids = kernels.sigmoid_topk(logits, bias, 4, softcap=0.0, routed_scaling_factor=2.5)
        return weights, ids, kernels.llama4_topk(logits, 2), kernels.softplus_gate(attn, gate, 32)

    torch._dynamo.reset()
    got = torch.compile(layer, backend="eager", fullgraph=True, dynamic=True)(logits, bias, attn, gate)
    want = layer(logits, bias, attn, gate)
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert torch.equal(g, w)


class _Layer(torch.nn.Module):
    def forward(self, logits, bias, attn, gate):
        weights, ids = kernels.sigmoid_topk(logits, bias, 8, softcap=0.0, routed_scaling_factor=2.5)
        l4_weights, l4_ids = kernels.llama4_topk(logits, 1)
        return weights, ids, l4_weights, l4_ids, kernels.softplus_gate(attn, gate, 128)


def test_dynamo_sees_one_opaque_op_per_call_on_cuda():
    """What vLLM's compile sees on a GPU: Dynamo (strict export) over fake CUDA tensors."""
    with FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True):
        logits = torch.empty(5, 256, device="cuda", dtype=torch.bfloat16)
        bias = torch.empty(256, device="cuda")
        attn = torch.empty(5, 48 * 128, device="cuda", dtype=torch.bfloat16)
        gate = torch.empty(5, 48, device="cuda", dtype=torch.bfloat16)
    tokens = torch.export.Dim("tokens", min=2)
    dynamic = {"logits": {0: tokens}, "bias": None, "attn": {0: tokens}, "gate": {0: tokens}}
    program = torch.export.export(_Layer(), (logits, bias, attn, gate), dynamic_shapes=dynamic, strict=True)
    calls = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert [target for target in calls if isinstance(target, torch._ops.OpOverload)] == [
        torch.ops.vllm_laguna.sigmoid_topk.default,
        torch.ops.vllm_laguna.llama4_topk.default,
        torch.ops.vllm_laguna.softplus_gate.default,
    ]
    outputs = [n.meta["val"] for n in program.graph.find_nodes(op="output")[0].args[0]]
    symbolic_tokens = outputs[0].shape[0]
    assert [(tuple(o.shape), o.dtype, o.device.type) for o in outputs] == [
        ((symbolic_tokens, 8), torch.float32, "cuda"),
        ((symbolic_tokens, 8), torch.int32, "cuda"),
        ((symbolic_tokens, 1), torch.float32, "cuda"),
        ((symbolic_tokens, 1), torch.int32, "cuda"),
        ((symbolic_tokens, 48 * 128), torch.bfloat16, "cuda"),
    ]
    assert isinstance(symbolic_tokens, torch.SymInt)


def test_use_triton_follows_device_and_override(monkeypatch):
    with FakeTensorMode():
        on_cuda = torch.empty(2, 8, device="cuda")
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    monkeypatch.setattr(dispatch, "TRITON_INTERPRET", False)
    monkeypatch.setattr(dispatch, "FORCE_TORCH", False)
    assert dispatch.use_triton(on_cuda) and not dispatch.use_triton(torch.empty(2, 8))
    monkeypatch.setattr(dispatch, "FORCE_TORCH", True)
    assert not dispatch.use_triton(on_cuda)


def test_torch_override_from_environment_and_cheap_import():
    """A fresh process: the override is read from the environment; importing the package
    (and so the model code) pulls in neither triton nor the kernel modules."""
    probe = (
        "import json, sys; from vllm_laguna.kernels import dispatch; print(json.dumps("
        "[dispatch.FORCE_TORCH, [m for m in sys.modules if m == 'triton' or m.endswith('_triton')]]))"
    )
    env = dict(os.environ, VLLM_LAGUNA_TORCH_KERNELS="1")
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [True, []]


def test_causal_conv_dispatch(monkeypatch):
    """The conv entry points run the torch reference on CPU tensors (bit for bit, state
    writes included) and hand the same arguments to the Triton kernels wherever
    ``use_triton`` says so (a CUDA tensor, or the interpreter)."""
    import lfm2_helpers
    from vllm_laguna.kernels import causal_conv1d as conv

    batch = lfm2_helpers.conv_batch([3, 1, 6], [4, 0, 2], [True, False, True])
    decode = lfm2_helpers.conv_batch([1, 1], [5, 1], [True, True], seed=1)
    for run, reference, case, rest in [
        (conv.causal_conv1d_prefill, conv.causal_conv1d_prefill_torch, batch,
         (batch.query_start_loc, batch.slots, batch.has_initial_state)),
        (conv.causal_conv1d_decode, conv.causal_conv1d_decode_torch, decode, (decode.slots,)),
    ]:  # fmt: skip
        reference_state = case.conv_state.clone()
        got = run(case.x, case.weight, case.bias, case.conv_state, *rest)
        want = reference(case.x, case.weight, case.bias, reference_state, *rest)
        assert torch.equal(got, want) and torch.equal(case.conv_state, reference_state)

    calls = []  # the Triton module, stood in for: this checks where dispatch goes, not Triton
    kernels_module = types.ModuleType("vllm_laguna.kernels.causal_conv1d_triton")
    for name in ("causal_conv1d_prefill_triton", "causal_conv1d_decode_triton"):
        setattr(kernels_module, name, lambda *args, _name=name: calls.append((_name, args)) or "triton")
    monkeypatch.setitem(sys.modules, kernels_module.__name__, kernels_module)
    monkeypatch.setattr(conv, "use_triton", lambda tensor: True)
    assert conv.causal_conv1d_prefill(batch.x, batch.weight, None, batch.conv_state, batch.query_start_loc,
                                      batch.slots, batch.has_initial_state) == "triton"  # fmt: skip
    assert conv.causal_conv1d_decode(decode.x, decode.weight, None, decode.conv_state, decode.slots) == "triton"
    assert [name for name, _ in calls] == ["causal_conv1d_prefill_triton", "causal_conv1d_decode_triton"]
    assert calls[0][1][0] is batch.x and calls[1][1][4] is decode.slots
