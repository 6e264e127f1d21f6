"""LFM2's gated short-convolution block, with its per-request state in vLLM's mamba cache.

``out_proj(C * conv(B * x))`` where ``B, C, x`` are the three thirds of ``in_proj(h)`` and
``conv`` is a depthwise causal conv over time with kernel L (``conv_L_cache``); with
``conv_bias`` all three of ``in_proj``, the conv and ``out_proj`` carry a bias. Shapes on one
tensor-parallel rank, T tokens, D = hidden_size / tp channels: ``in_proj`` ``[T, 3D]``
(column-parallel, B/C/x sharded alike), ``B*x`` ``[T, D]``, conv weight ``[D, L]``,
``out_proj`` row-parallel back to ``[T, hidden_size]``.

How the state flows through vLLM (see ``docs/DESIGN.md``):

1. The layer is a :class:`MambaBase`: it declares one state, ``L - 1`` columns of ``B*x``
   per channel, in the model dtype (or ``mamba_cache_dtype``). vLLM's KV-cache manager
   allocates it per request in the unified cache, beside the attention layers' blocks.
2. vLLM binds the cache to ``self.kv_cache`` (``[num_slots, L-1, D]``, or ``[num_slots, D, L-1]``
   with ``VLLM_SSM_CONV_STATE_LAYOUT=DS``); the layer works on the ``[num_slots, D, L-1]`` view.
3. Every step, vLLM's short-conv metadata builder puts decode requests first, then prefill
   requests (whole prompts or chunks of them), and gives each its slot index and, for
   prefills, whether the slot already holds the request's earlier inputs.
4. The conv itself runs in a custom op (``torch.ops.vllm.laguna_short_conv``) that
   torch.compile leaves opaque and piecewise CUDA graphs split on, because it reads the
   step's metadata: prefills read their initial state and write their last ``L - 1`` inputs,
   decodes shift one input into their slot in place. Requests touch only their own slot.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from vllm import _custom_ops as ops
from vllm.compilation.breakable_cudagraph import eager_break_during_capture
from vllm.config import CacheConfig, ModelConfig, VllmConfig, get_current_vllm_config
from vllm.distributed import divide, get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateDtypeCalculator,
    MambaStateShapeCalculator,
    is_conv_state_dim_first,
)
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.model_loader.weight_utils import sharded_weight_loader
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import CpuArchEnum, current_platform
from vllm.utils.torch_utils import direct_register_custom_op
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum
from vllm.v1.attention.backends.short_conv_attn import ShortConvAttentionMetadata
from vllm.v1.attention.backends.utils import PAD_SLOT_ID

from vllm_laguna.configs.lfm2 import Lfm2Arch
from vllm_laguna.kernels.causal_conv1d import causal_conv1d_decode, causal_conv1d_prefill
from vllm_laguna.kernels.dispatch import FORCE_TORCH
from vllm_laguna.model_executor.checkpoint import CheckpointError

#: the custom op the conv runs in; piecewise CUDA graphs must split on it
SPLITTING_OP = "vllm::laguna_short_conv"


def conv_state_shape(arch: Lfm2Arch, tp_size: int) -> tuple[tuple[int, ...], ...]:
    """The per-slot state shapes one rank declares (one state: ``L - 1`` columns x D)."""
    return MambaStateShapeCalculator.short_conv_state_shape(
        tp_world_size=tp_size, intermediate_size=arch.hidden_size, conv_kernel=arch.conv_kernel
    )


def conv_state_dtype(model_config: ModelConfig, cache_config: CacheConfig) -> tuple[torch.dtype, ...]:
    """The state dtype: the model dtype unless ``mamba_cache_dtype`` says otherwise."""
    return MambaStateDtypeCalculator.short_conv_state_dtype(model_config.dtype, cache_config.mamba_cache_dtype)


def check_supported(vllm_config: VllmConfig) -> None:
    """Reject engine features the conv-state contract here does not cover, by name."""
    if vllm_config.num_speculative_tokens:
        raise NotImplementedError(
            "LFM2 conv layers (vllm-laguna) do not support speculative decoding: the conv "
            "state keeps conv_L_cache - 1 columns and no per-draft-token history"
        )


class DepthwiseConv(nn.Module):
    """The depthwise kernel ``[D, L]`` (and bias ``[D]``) of this rank's channels, sharded
    like ``in_proj``'s thirds. Plain parameters, not a linear layer: vLLM's CPU backend
    repacks linear weights after loading, and this one is read directly by the kernels."""

    def __init__(self, channels: int, kernel: int, bias: bool, prefix: str):
        super().__init__()
        self.channels, self.kernel, self.prefix = channels, kernel, prefix
        local = divide(channels, get_tensor_model_parallel_world_size())
        self.weight = nn.Parameter(torch.empty(local, kernel), requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": self._load_weight})
        if bias:
            self.bias = nn.Parameter(torch.empty(local), requires_grad=False)
            set_weight_attrs(self.bias, {"weight_loader": sharded_weight_loader(0)})
        else:
            self.register_parameter("bias", None)

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        shape = list(loaded.shape)
        if loaded.dim() == 3 and loaded.shape[1] == 1:  # nn.Conv1d's [D, 1, L]
            loaded = loaded.squeeze(1)
        if tuple(loaded.shape) != (self.channels, self.kernel):
            raise CheckpointError(
                f"{self.prefix}.weight has shape {shape}; the config (hidden_size, "
                f"conv_L_cache) expects [{self.channels}, 1, {self.kernel}]"
            )
        sharded_weight_loader(0)(param, loaded)


class ShortConv(MambaBase, nn.Module):
    """LFM2's conv block; ``prefix`` names its state (the layer name in vLLM's metadata)."""

    def __init__(
        self,
        arch: Lfm2Arch,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ):
        super().__init__()
        vllm_config = get_current_vllm_config()
        check_supported(vllm_config)
        self.arch = arch
        self.model_config = model_config
        self.cache_config = cache_config
        self.prefix = prefix
        hidden, bias = arch.hidden_size, arch.conv_bias
        self.in_proj = MergedColumnParallelLinear(
            hidden, [hidden] * 3, bias=bias, quant_config=quant_config, prefix=f"{prefix}.in_proj"
        )
        self.conv = DepthwiseConv(hidden, arch.conv_kernel, bias, prefix=f"{prefix}.conv")
        self.out_proj = RowParallelLinear(
            hidden, hidden, bias=bias, quant_config=quant_config, prefix=f"{prefix}.out_proj"
        )
        self.kv_cache = (torch.tensor([]),)

        compilation_config = vllm_config.compilation_config
        if prefix in compilation_config.static_forward_context:
            raise ValueError(f"duplicate layer name: {prefix}")
        compilation_config.static_forward_context[prefix] = self
        if compilation_config.splitting_ops is not None and SPLITTING_OP not in compilation_config.splitting_ops:
            compilation_config.splitting_ops.append(SPLITTING_OP)

    # -- MambaBase: what vLLM allocates for this layer ------------------------------------

    def get_state_shape(self) -> tuple[tuple[int, ...], ...]:
        return conv_state_shape(self.arch, get_tensor_model_parallel_world_size())

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return conv_state_dtype(self.model_config, self.cache_config)

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.SHORT_CONV

    # -- forward ---------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[T, hidden]`` -> ``[T, hidden]``; only the conv over time leaves the graph."""
        bcx, _ = self.in_proj(hidden_states)
        b, c, x = bcx.chunk(3, dim=-1)
        bx = (b * x).contiguous()
        conv_out = torch.empty_like(bx)
        torch.ops.vllm.laguna_short_conv(bx, conv_out, self.prefix)
        out, _ = self.out_proj(c * conv_out)
        return out

    def conv_with_state(self, bx: torch.Tensor, out: torch.Tensor) -> None:
        """The conv over time of this step's requests, each against its own state slot.

        ``bx``: ``[T, D]``, decode tokens first (one per request), then the prefill tokens;
        ``out`` receives the conv output, rows past the step's real tokens zeroed.
        """
        metadata = step_metadata(self.prefix)
        if metadata is None:  # a dummy run: no request, no slot, the output is discarded
            out.copy_(bx)
            return
        weight = self.conv.weight  # [D, L]
        bias = self.conv.bias
        state = self.kv_cache[0] if is_conv_state_dim_first() else self.kv_cache[0].transpose(-1, -2)
        num_decode = metadata.num_decode_tokens
        num_tokens = num_decode + metadata.num_prefill_tokens
        if metadata.num_decodes > 0:
            slots = metadata.state_indices_tensor_d[: metadata.num_decodes, 0]
            out[:num_decode] = conv_decode_step(bx[:num_decode], weight, bias, state, slots)
        if metadata.num_prefills > 0:
            out[num_decode:num_tokens] = causal_conv1d_prefill(
                bx[num_decode:num_tokens],
                weight,
                bias,
                state,
                metadata.query_start_loc_p,
                metadata.state_indices_tensor_p,
                metadata.has_initial_states_p,
            )
        out[num_tokens:] = 0


@functools.cache
def vllm_cpu_conv_update_available() -> bool:
    """Whether vLLM's C++ decode kernel for causal convs is here: vLLM's CPU build on x86,
    where vLLM's own LFM2 uses it (on Arm it runs torch ops instead)."""
    return (
        current_platform.is_cpu()
        and current_platform.get_cpu_architecture() == CpuArchEnum.X86
        and hasattr(torch.ops._C, "causal_conv1d_update_cpu_vec")
    )


def conv_decode_step(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv_state: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """:func:`causal_conv1d_decode` (one token per request, ``x`` ``[N, D]``, slots updated in
    place). On vLLM's x86 CPU backend, with one dtype throughout, vLLM's C++ kernel
    (``causal_conv1d_update_cpu_vec``) runs it, equal to the torch reference (bf16: bit for bit,
    outputs and states, either state layout; fp32: the states bit for bit, the outputs within
    an ulp where a bias is summed in another order), in one call instead of a dozen torch ops (D =
    512, one request: 22 against 324 us; 32 requests: 110 against 806 us). Elsewhere, with a
    conv state in another dtype than the model, or with ``VLLM_LAGUNA_TORCH_KERNELS=1``, the
    kernels' dispatch (torch reference on CPU, Triton on CUDA). The choice is made here, not in
    that dispatch, because :mod:`vllm_laguna.kernels` imports without vLLM (the GPU kernel
    benchmark runs where vLLM is not installed). vLLM's CPU runner never pads a decode batch:
    every slot here is a request's."""
    if (
        not FORCE_TORCH
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == conv_state.dtype
        and vllm_cpu_conv_update_available()
    ):
        return ops.causal_conv1d_update_cpu_vec(
            x, conv_state, weight, bias, conv_state_indices=slots.contiguous(), pad_slot_id=PAD_SLOT_ID
        )
    return causal_conv1d_decode(x, weight, bias, conv_state, slots)


def step_metadata(layer_name: str) -> ShortConvAttentionMetadata | None:
    """The current step's short-conv metadata of ``layer_name``; None in vLLM's dummy runs.

    vLLM runs the model without any attention metadata (``attn_metadata is None``) only in
    ``GPUModelRunner._dummy_run`` without ``force_attention`` (which the CPU runner inherits):
    the memory-profiling run at start-up, torch.compile warm-up, piecewise CUDA-graph
    capture. No request holds a state slot there and the output is thrown away. Every real
    step brings a dict with the metadata of every attention and mamba layer; this layer
    missing from it would mean vLLM never allocated its state, and the conv would silently
    compute something else. That raises, naming the layer.
    """
    metadata = get_forward_context().attn_metadata
    if metadata is None:
        return None
    entry = metadata.get(layer_name) if isinstance(metadata, dict) else metadata
    if not isinstance(entry, ShortConvAttentionMetadata):
        raise RuntimeError(
            f"{layer_name}: this step has no short-conv metadata for the layer (got "
            f"{type(entry).__name__} from {type(metadata).__name__} attention metadata): its conv "
            "state was not allocated by vLLM's KV-cache manager"
        )
    return entry


@eager_break_during_capture
def laguna_short_conv(bx: torch.Tensor, out: torch.Tensor, layer_name: str) -> None:
    layer = get_forward_context().no_compile_layers[layer_name]
    layer.conv_with_state(bx, out)


def _laguna_short_conv_fake(bx: torch.Tensor, out: torch.Tensor, layer_name: str) -> None:
    return None


direct_register_custom_op(
    op_name="laguna_short_conv",
    op_func=laguna_short_conv,
    mutates_args=["out"],
    fake_impl=_laguna_short_conv_fake,
)
