"""Tiny Laguna checkpoints whose greedy decoding recites a fixed script, for end-to-end tests
of the server, the parsers and the chat template without a trained model.

The network is made a bigram table: every attention and MLP output projection is zero, so
the residual stream stays the token's embedding and the logits are
``lm_head @ rmsnorm(embedding)``. The embeddings of the script's tokens are orthogonal
(scaled to unit RMS, final norm weight 1), and the ``lm_head`` row of each token is the sum
of the embeddings of the tokens it follows: after token ``a`` the logit of its successor is
``LOGIT`` and every other logit is 0. Since only the last token counts, the prompt's last
token picks the script: with Laguna's chat template that is ``<think>`` (thinking on) or
``</think>`` (thinking off).

A script is given as chains of text pieces; each piece becomes one token (Laguna's marker
tokens keep their ids, other pieces are added to the tokenizer), and a token may have only
one successor. Optional *fallback* chains give a token a second choice, at ``FALLBACK_LOGIT``:
greedy decoding takes it only where the scripted successor is forbidden, e.g. by a
structured-output grammar — so one checkpoint answers in prose without a grammar and in
JSON under a JSON schema. The checkpoint is otherwise a normal tiny Laguna (layout, config,
tokenizer, chat template), loaded by vLLM through this plugin like any other.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vllm_laguna.laguna_format import SINGLE_TOKEN_MARKERS
from vllm_laguna.tiny.laguna import LagunaTiny
from vllm_laguna.tiny.tokenizer import build_tokenizer
from vllm_laguna.tiny.weights import save_checkpoint

#: the logit of the scripted successor (all others are 0)
LOGIT = 30.0
#: the logit of a fallback successor: below the scripted one, above everything else
FALLBACK_LOGIT = 15.0

_ZEROED = ("self_attn.o_proj.weight", "down_proj.weight")


def _byte_level(text: str) -> str:
    """``text`` in the byte-level BPE alphabet (GPT-2's byte -> character map)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    return "".join(alphabet[b] for b in text.encode("utf-8"))


def script_edges(chains: Sequence[Sequence[str]]) -> dict[str, str]:
    """Successor of each piece; ValueError if a piece would need two."""
    edges: dict[str, str] = {}
    for chain in chains:
        for a, b in itertools.pairwise(chain):
            if edges.setdefault(a, b) != b:
                raise ValueError(f"piece {a!r} is followed by both {edges[a]!r} and {b!r}: a bigram script allows one")
    return edges


def build_scripted(
    out_dir: str | Path,
    chains: Sequence[Sequence[str]],
    *,
    fallbacks: Sequence[Sequence[str]] = (),
    special_markers: bool = True,
    spec: LagunaTiny | None = None,
    **options: Any,
) -> Path:
    """Write a checkpoint whose greedy continuation of any prompt ending in a chain's
    piece follows that chain. ``fallbacks``: chains of second choices (see the module
    docstring). ``special_markers``: whether the tokenizer calls
    ``<think>``/``<tool_call>``... special (then only a parser that asks for
    ``skip_special_tokens=False`` sees them). ``options`` override fields of ``spec``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    edges = script_edges(chains)
    second = script_edges(fallbacks)
    pieces = list(dict.fromkeys(p for chain in (*chains, *fallbacks) for p in chain))
    for piece in pieces:
        if piece not in SINGLE_TOKEN_MARKERS and any(m in piece for m in SINGLE_TOKEN_MARKERS):
            raise ValueError(f"script piece {piece!r} contains a marker token; make the marker a piece of its own")
    # extra pieces are stored in the byte-level alphabet, as the decoder reads every token
    extra = {p: _byte_level(p) for p in pieces if p not in SINGLE_TOKEN_MARKERS}
    tokenizer_size = build_tokenizer(out, 512, special_markers=special_markers, extra_tokens=list(extra.values()))

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = {p: tokenizer.convert_tokens_to_ids(extra.get(p, p)) for p in pieces}
    for piece, token_id in ids.items():
        assert tokenizer.decode([token_id]) == piece, (piece, tokenizer.decode([token_id]))

    sources = list(dict.fromkeys([*edges, *second]))
    hidden = max(64, -(-len(sources) // 32) * 32)
    spec = dataclasses.replace(
        spec or LagunaTiny(), hidden_size=hidden, vocab_size=-(-tokenizer_size // 64) * 64, dtype="float32", **options
    )
    state = spec.hub_state_dict()
    for name, tensor in state.items():
        if name.endswith(_ZEROED):
            tensor.zero_()
    state["model.norm.weight"].fill_(1.0)
    embed = state["model.embed_tokens.weight"]
    # orthonormal rows scaled to unit RMS, so the final RMSNorm leaves them as they are
    basis, _ = torch.linalg.qr(torch.randn(hidden, len(sources), generator=torch.Generator().manual_seed(spec.seed)))
    for column, piece in enumerate(sources):
        embed[ids[piece]] = basis[:, column] * hidden**0.5
    head = torch.zeros(spec.vocab_size, hidden)
    for successors, logit in ((edges, LOGIT), (second, FALLBACK_LOGIT)):
        for a, b in successors.items():
            head[ids[b]] += embed[ids[a]] * (logit / hidden)
    if spec.tie_word_embeddings:
        raise ValueError("a scripted checkpoint needs its own lm_head (tie_word_embeddings=False)")
    state["lm_head.weight"] = head
    save_checkpoint(out, spec.config(), state, generation={"eos_token_id": [2, 24]})
    script = {"chains": [list(c) for c in chains], "fallbacks": [list(c) for c in fallbacks]}
    (out / "script.json").write_text(json.dumps(script, ensure_ascii=False, indent=1))
    return out
