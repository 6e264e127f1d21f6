"""Config of a Laguna DFlash drafter (poolside's ``Laguna-*-DFlash``, vLLM architecture
``DFlashLagunaForCausalLM``): read, validate, resolve.

The drafter's ``config.json`` is a Laguna config (``model_type: "laguna"``) for the drafter's
own layers, plus:

* ``dflash_config.target_layer_ids``: the target layers whose output the drafter reads (one
  aux hidden state each, in this order); ``eagle_aux_hidden_state_layer_ids``, when present,
  says the same thing as vLLM's aux-layer ids (``target_layer_ids + 1``: the layer whose
  input is captured), and vLLM reads it first, so the two must agree;
* ``dflash_config.mask_token_id``: the token fed at the masked block positions;
* ``draft_vocab_size``: must equal the target's vocabulary (the drafter shares the target's
  embedding and LM head).

vLLM requires uniform ``layer_types`` (all ``sliding_attention`` in the published drafters);
the drafter MLPs are dense. vLLM hands the model its own ``EAGLEConfig`` wrapping the JSON,
which carries these keys as attributes.

vLLM also requires every drafter layer to land in one KV-cache group, which bounds the
drafter's ``num_hidden_layers`` on a target that mixes full and sliding layers:
:func:`check_kv_cache_grouping` (the rule is in :func:`draft_layers_share_a_kv_cache_group`).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil
from typing import Any

from vllm_laguna.configs.errors import ConfigError
from vllm_laguna.configs.laguna import LagunaArch, parse_laguna_config

MODEL = "Laguna DFlash drafter"


#: the drafter's keys besides a Laguna config's (README: Config keys), and the two fields of
#: vLLM's ``EAGLEConfig`` wrapper (``model``: the wrapped config; ``truncated_vocab_size``)
DFLASH_KEYS = frozenset(
    {"dflash_config", "draft_vocab_size", "eagle_aux_hidden_state_layer_ids", "model", "truncated_vocab_size"}
)


@dataclass(frozen=True)
class LagunaDFlashArch:
    """The drafter's layers (a Laguna decoder) and how it reads its target."""

    layers: LagunaArch
    #: target layers whose output (residual stream before the next layer) is read, in order
    target_layer_ids: tuple[int, ...]
    #: width of each aux hidden state (the target's hidden size)
    target_hidden_size: int
    mask_token_id: int


def parse_laguna_dflash_config(
    config: Any, target_num_layers: int, target_vocab_size: int, target_hidden_size: int
) -> LagunaDFlashArch:
    """Validate a drafter config against its target and resolve it.

    Raises:
        ConfigError: naming the offending field and the value expected.
    """
    layers = parse_laguna_config(config, extra_keys=DFLASH_KEYS)
    if len(set(layers.layer_types)) != 1:
        raise ConfigError(MODEL, "layer_types", "one layer type for every drafter layer", list(layers.layer_types))
    if "sparse" in layers.mlp_layer_types:
        raise ConfigError(
            MODEL, "mlp_layer_types", 'all "dense" (drafter MLPs are dense)', list(layers.mlp_layer_types)
        )

    dflash = getattr(config, "dflash_config", None)
    if not isinstance(dflash, dict):
        raise ConfigError(MODEL, "dflash_config", "a dict with target_layer_ids", dflash)
    ids = dflash.get("target_layer_ids")
    if (
        not isinstance(ids, (list, tuple))
        or not ids
        or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < target_num_layers for i in ids)
    ):
        raise ConfigError(
            MODEL,
            "dflash_config.target_layer_ids",
            f"a non-empty list of target layer indices in [0, {target_num_layers})",
            ids,
        )
    aux_ids = getattr(config, "eagle_aux_hidden_state_layer_ids", None)
    if aux_ids and list(aux_ids) != [i + 1 for i in ids]:
        raise ConfigError(
            MODEL,
            "eagle_aux_hidden_state_layer_ids",
            f"dflash_config.target_layer_ids + 1 = {[i + 1 for i in ids]} (vLLM reads this key first)",
            list(aux_ids),
        )
    if dflash.get("use_aux_hidden_state", True) is not True:
        raise ConfigError(MODEL, "dflash_config.use_aux_hidden_state", "true (the drafter reads the target)", False)

    draft_vocab = getattr(config, "draft_vocab_size", None)
    if draft_vocab != target_vocab_size or layers.vocab_size != target_vocab_size:
        raise ConfigError(
            MODEL,
            "draft_vocab_size",
            f"the target's vocab_size={target_vocab_size} (the drafter shares its embedding and LM head)",
            draft_vocab,
        )
    if layers.hidden_size != target_hidden_size:
        raise ConfigError(
            MODEL,
            "hidden_size",
            f"the target's hidden_size={target_hidden_size} (shared embedding)",
            layers.hidden_size,
        )
    mask = dflash.get("mask_token_id")
    if isinstance(mask, bool) or not isinstance(mask, int) or not 0 <= mask < target_vocab_size:
        raise ConfigError(MODEL, "dflash_config.mask_token_id", f"a token id in [0, {target_vocab_size})", mask)
    return LagunaDFlashArch(
        layers=layers,
        target_layer_ids=tuple(ids),
        target_hidden_size=target_hidden_size,
        mask_token_id=mask,
    )


def draft_layers_share_a_kv_cache_group(
    num_full: int, num_sliding: int, num_draft: int, draft_joins_full: bool
) -> bool:
    """Whether vLLM's KV-cache grouping puts all ``num_draft`` drafter layers in one group, for
    a target of ``num_full`` full_attention and ``num_sliding`` sliding_attention layers.

    vLLM's DFlash proposer runs every drafter layer with one KV-cache group's attention
    metadata and asserts they share a group ("All drafting layers should belong to the same
    kv cache group", ``validate_same_kv_cache_group``, vLLM 0.32 and 0.33). The grouping
    (``get_kv_cache_groups``; for mixed attention types ``_get_kv_cache_groups_uniform_page_size``,
    the same code in 0.32 and 0.33):

    * without sliding layers every layer is full attention: one group, any drafter fits;
    * otherwise layers are bucketed by KV spec: the target's full layers, its sliding layers,
      and the drafter's layers (a full-attention spec, see ``models/laguna_dflash.py``), which
      join the target's full bucket, after its layers, when their spec is the same, i.e. the
      same K/V heads and head_dim per rank (``draft_joins_full``), else form a bucket of their
      own;
    * the group size ``g`` is the largest bucket if it is under 1.5x the smallest, else the
      smallest; a bucket of ``b`` layers becomes ``n = ceil(b / g)`` groups, layer ``i`` going
      to group ``i mod n``, so two or more consecutive drafter layers stay together only
      when their bucket is one group (``b <= g``).

    With ``--disable-hybrid-kv-cache-manager`` vLLM allocates sliding layers as full ones and
    makes one group; callers do not ask then. Covered: the layer-outermost KV-cache layouts
    (the CPU backend's only one, and vLLM's default); vLLM packs groups differently under a
    block-outermost layout (``VLLM_KV_CACHE_LAYOUT=BL...``, or DCP with a replicated drafter),
    which this rule does not model.
    """
    if num_draft == 1 or num_sliding == 0:
        return True
    bucket, group_size = _draft_bucket(num_full, num_sliding, num_draft, draft_joins_full)
    return bucket <= group_size


def _draft_bucket(num_full: int, num_sliding: int, num_draft: int, draft_joins_full: bool) -> tuple[int, int]:
    """(layers in the drafter's bucket, vLLM's layers per group) on a hybrid target (see above)."""
    bucket = num_full + num_draft if draft_joins_full else num_draft
    sizes = [b for b in (bucket, num_sliding, 0 if draft_joins_full else num_full) if b]
    smallest, largest = min(sizes), max(sizes)
    return bucket, largest if largest < 1.5 * smallest else smallest


def check_kv_cache_grouping(
    arch: LagunaDFlashArch, target: LagunaArch, tensor_parallel_size: int, hybrid_kv_cache_manager: bool
) -> None:
    """Refuse, at load, a drafter whose layers vLLM would spread over several KV-cache groups
    (:func:`draft_layers_share_a_kv_cache_group`); the worker would otherwise stop on an
    ``AssertionError`` after profiling, when it binds the KV caches.

    ``hybrid_kv_cache_manager``: vLLM's ``not scheduler_config.disable_hybrid_kv_cache_manager``
    (without it every layer is in one group).

    Raises:
        ConfigError: on ``num_hidden_layers``, naming the target's layer pattern, why, the
            drafter layer counts that work for this target and the engine flag that lifts it.
    """
    num_draft = arch.layers.num_layers
    num_full = target.layer_types.count("full_attention")
    num_sliding = target.layer_types.count("sliding_attention")
    # K/V heads per rank, as AttentionHeads (layers/attention_heads.py) splits or replicates them
    draft_kv = (max(1, arch.layers.num_kv_heads // tensor_parallel_size), arch.layers.head_dim)
    target_kv = (max(1, target.num_kv_heads // tensor_parallel_size), target.head_dim)
    joins = draft_kv == target_kv
    if not hybrid_kv_cache_manager or draft_layers_share_a_kv_cache_group(num_full, num_sliding, num_draft, joins):
        return
    # The counts that fit are 1..m (tests/test_laguna_dflash_config.py checks it on vLLM's grouping).
    most = max(d for d in range(1, num_draft) if draft_layers_share_a_kv_cache_group(num_full, num_sliding, d, joins))
    counts = "1" if most == 1 else f"1 to {most}"
    bucket, group_size = _draft_bucket(num_full, num_sliding, num_draft, joins)
    placed = (
        f"join the target's full_attention layers (same K/V shape: {draft_kv[0]} heads x {draft_kv[1]} "
        f"per rank) in a bucket of {bucket} layers"
        if joins and num_full
        else f"form a bucket of their own (K/V {draft_kv[0]} heads x {draft_kv[1]} per rank, the "
        f"target's {target_kv[0]} x {target_kv[1]})"
    )
    raise ConfigError(
        MODEL,
        "num_hidden_layers",
        f"{counts} drafter layers for this target ({num_full} full_attention + {num_sliding} "
        f"sliding_attention layers). vLLM runs all drafter layers on one KV-cache group's attention "
        f"metadata, so they must all fall in one group; it groups this hybrid target's KV caches "
        f"by attention type in groups of {group_size} layers, and the drafter's full-attention KV "
        f"caches {placed}, which vLLM splits over {ceil(bucket / group_size)} groups. Drafter layer "
        f"counts that work for this target: {counts}; or start vLLM with "
        f"--disable-hybrid-kv-cache-manager (one group for all layers; sliding layers then keep "
        f"the KV cache of their whole context)",
        num_draft,
    )
