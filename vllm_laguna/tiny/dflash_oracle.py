"""A tiny Laguna target and a DFlash drafter, both hand-set, where the drafter's first
draft is always right: a test that DFlash's context path works (the target's aux hidden
states, the drafter's ``fc`` and its context K/V in the KV cache), which random weights,
accepting nothing, cannot show.

**Target** — a bigram table over a cycle of ``CYCLE_LENGTH`` tokens: every attention and MLP
output projection is zero, so the residual stream is the token's embedding at every layer;
cycle tokens have orthonormal embeddings ``u_t`` (unit RMS) and ``lm_head`` gives the successor
``succ(t)`` the logit ``LOGIT``. Greedy decoding of a cycle token walks the cycle.

**Drafter** (two layers, window 3). ``fc`` maps the aux hidden state of target layer 0 at
position ``j`` (``u_{x_j}``) to ``v_{succ(x_j)}``, a second orthonormal family, as the
context state; layer 0 is inert (zero output projections). In layer 1 only context states
have a key (one shared direction ``kappa``, in head dimensions RoPE leaves alone), only the
mask token has a query (``kappa`` too, scaled), and the value of ``v_t`` carries ``t``;
``o_proj`` turns it back into ``u_t``. With the window, the first masked position ``p + 1``
(anchor at ``p``) sees context position ``p - 1`` only, whose state is
``v_{succ(x_{p-1})} = v_{anchor}``, so its output is ``u_{anchor}`` and the target's LM head
drafts ``succ(anchor)``: right every time. Later masked positions see no context and draft
token 0: always rejected. A drafter whose context K/V are wrong for layer 1 accepts nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_laguna.tiny.laguna import DFLASH_MASK_TOKEN_ID, LagunaDFlashTiny, LagunaTiny, build_laguna_dflash
from vllm_laguna.tiny.tokenizer import NUM_SPECIAL, build_tokenizer
from vllm_laguna.tiny.weights import save_checkpoint

CYCLE_LENGTH = 16
#: the cycle's tokens, in cycle order (a fixed shuffle of ids above the special tokens)
CYCLE = [NUM_SPECIAL + i for i in torch.randperm(CYCLE_LENGTH, generator=torch.Generator().manual_seed(3)).tolist()]
LOGIT = 30.0

TARGET = LagunaTiny()
DRAFTER = LagunaDFlashTiny(
    sliding_window=3,
    num_heads=2,
    num_kv_heads=2,
    head_dim=32,
    # RoPE turns only the first 8 of 32 head dimensions; the query/key direction is beyond them
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    },
    target_layer_ids=[0, 2],
)


def successor(token: int) -> int:
    return CYCLE[(CYCLE.index(token) + 1) % CYCLE_LENGTH]


def _bases(hidden: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthonormal columns: ``u`` (cycle embeddings), ``v`` (context states), ``m`` (mask)."""
    basis, _ = torch.linalg.qr(torch.randn(hidden, 2 * CYCLE_LENGTH + 1, generator=torch.Generator().manual_seed(4)))
    return basis[:, :CYCLE_LENGTH], basis[:, CYCLE_LENGTH : 2 * CYCLE_LENGTH], basis[:, -1]


def build_dflash_oracle(out_dir: str | Path) -> tuple[Path, Path]:
    """Write the target to ``out_dir/target`` and its drafter to ``out_dir/drafter``."""
    out = Path(out_dir)
    H = TARGET.hidden_size
    u, v, m = _bases(H)
    index = {t: i for i, t in enumerate(CYCLE)}

    state = TARGET.hub_state_dict()
    for name, tensor in state.items():
        if name.endswith(("self_attn.o_proj.weight", "down_proj.weight")):
            tensor.zero_()
    state["model.norm.weight"].fill_(1.0)
    embed = state["model.embed_tokens.weight"]
    for t, i in index.items():
        embed[t] = u[:, i] * H**0.5
    embed[DFLASH_MASK_TOKEN_ID] = m * H**0.5
    head = torch.zeros(TARGET.vocab_size, H)
    for t, i in index.items():
        head[successor(t)] = u[:, i] * (LOGIT / H**0.5)
    state["lm_head.weight"] = head
    target_dir = out / "target"
    save_checkpoint(target_dir, TARGET.config(), state, generation={"eos_token_id": [2, 24]})
    build_tokenizer(target_dir, vocab_size=TARGET.vocab_size)

    drafter = DRAFTER.state_dict(TARGET)
    for name, tensor in drafter.items():
        if "norm" in name:
            tensor.fill_(1.0)
    fc = torch.zeros_like(drafter["fc.weight"])
    for t, i in index.items():  # aux slice 0 (target layer 0): u_t -> v_succ(t)
        fc[:, :H] += torch.outer(v[:, index[successor(t)]], u[:, i])
    drafter["fc.weight"] = fc
    for inert in ("layers.0.self_attn.o_proj.weight", "layers.0.mlp.down_proj.weight", "layers.1.mlp.down_proj.weight"):
        drafter[inert].zero_()
    D, heads = DRAFTER.head_dim, DRAFTER.num_heads
    kappa = torch.zeros(D)
    kappa[-1] = 1.0
    q = torch.zeros(heads * D, H)
    q[:D] = torch.outer(kappa, m)  # head 0: only the mask token asks
    k = torch.zeros(DRAFTER.num_kv_heads * D, H)
    k[:D] = torch.outer(kappa, v.sum(dim=1))  # head 0: only context states answer
    val = torch.zeros_like(k)
    val[:CYCLE_LENGTH] = v.T  # head 0, dim i: how much of v_i
    drafter["layers.1.self_attn.qkv_proj.weight"] = torch.cat([q, k, val])
    for norm in ("q_norm", "k_norm"):
        drafter[f"layers.1.self_attn.{norm}.weight"].fill_(3.0)
    drafter["layers.1.self_attn.g_proj.weight"].zero_()
    o_proj = torch.zeros(H, heads * D)
    o_proj[:, :CYCLE_LENGTH] = u * 10.0  # dim i of head 0 -> u_i
    drafter["layers.1.self_attn.o_proj.weight"] = o_proj
    drafter_dir = build_laguna_dflash(out / "drafter", TARGET, DRAFTER, state_dict=drafter)
    return target_dir, drafter_dir


def cycle_prompts(lengths: list[int]) -> list[list[int]]:
    """Prompts walking the cycle from different starting points."""
    return [[CYCLE[(start + j) % CYCLE_LENGTH] for j in range(n)] for start, n in enumerate(lengths)]


