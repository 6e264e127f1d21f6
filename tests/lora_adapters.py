"""peft LoRA adapters for the tiny checkpoints, as users make them: peft on transformers'
model, ``save_pretrained``.

peft starts ``lora_B`` at zero (an adapter that changes nothing); these adapters get random
nonzero ``lora_B`` so every targeted projection moves the output.

The reference is the peft model that wrote the adapter, not one read back with
``PeftModel.from_pretrained``: with transformers 5.19 and peft 0.21, reading a Laguna adapter
back drops its shared-expert weights (transformers' Laguna key renaming
``mlp.shared_expert.`` -> ``mlp.shared_experts.`` is applied to names that already say
``shared_experts``), so the read-back model is not the adapter on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def build_peft_adapter(
    checkpoint: str | Path,
    out_dir: str | Path,
    target_modules: Sequence[str],
    rank: int = 8,
    alpha: int = 16,
    b_std: float = 0.05,
    seed: int = 0,
    target_parameters: Sequence[str] = (),
):
    """A LoRA adapter of ``rank`` on ``target_modules`` (transformers' module names) and
    ``target_parameters`` (its parameter names, such as fused experts' ``mlp.experts.down_proj``,
    which peft saves as ``...experts.lora_A``/``...experts.base_layer.lora_A``) of the
    checkpoint's transformers model, ``lora_B`` drawn with std ``b_std``, saved to ``out_dir``.
    Returns the peft model (fp32, eval; ``disable_adapter()`` gives the base model). Fails if
    a target module matches no module."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(target_modules), target_parameters=list(target_parameters)
    )
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    # lora_B of linear layers, lora_embedding_B of embeddings
    lora_b = {name: p for name, p in peft_model.named_parameters() if "lora_B" in name or "lora_embedding_B" in name}
    unmatched = [t for t in target_modules if not any(f".{t}.lora_" in name for name in lora_b)]
    assert not unmatched, f"peft found no module named {unmatched}"
    with torch.no_grad():
        for p in lora_b.values():
            p.copy_(torch.randn(p.shape, generator=gen) * b_std)
    peft_model.save_pretrained(str(out_dir))
    return peft_model.eval()
