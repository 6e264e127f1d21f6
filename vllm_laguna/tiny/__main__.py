"""``python -m vllm_laguna.tiny MODEL OUT_DIR [--preset NAME] [--set FIELD=JSON ...]``

Writes a tiny checkpoint with random weights (config, safetensors in the Hub layout,
tokenizer, chat template). ``--set`` overrides any field of the model's spec dataclass, the
value parsed as JSON when it parses (``--set layout='"transformers"'`` or
``--set layout=transformers`` both work), e.g.::

    python -m vllm_laguna.tiny laguna /tmp/laguna --set gating='"per-element"' --set router_softcap=1.0
    python -m vllm_laguna.tiny laguna /tmp/xs2 --preset xs2-scaled

``--quantize int8|int4`` (Laguna, Llama 4) writes the routed experts quantized by
compressed-tensors (int8 W8A8, or int4 W4A16 with ``--group-size``, default 128) to OUT_DIR
and their exact dequantized twin (fp32, no quantization config) to ``OUT_DIR-dequantized``
(:mod:`vllm_laguna.tiny.quantize`; Llama 4 is written with per-expert tensors, the layout of
its quantized checkpoints)::

    python -m vllm_laguna.tiny laguna /tmp/xs2-int4 --preset xs2-scaled --quantize int4
    python -m vllm_laguna.tiny llama4 /tmp/scout-int8 --preset scout-scaled --quantize int8
    python -m vllm_laguna.tiny laguna /tmp/xs2-int4-all --preset xs2-scaled --quantize int4 --linears
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import tempfile
from pathlib import Path

from vllm_laguna.tiny.quantize import SCHEMES, quantize_checkpoint

#: models ``--quantize`` takes -> spec fields it sets (the per-expert layout the writer reads)
QUANTIZABLE = {"laguna": {}, "llama4": {"expert_layout": "per-expert"}}

#: model name -> (module, spec class, builder)
BUILDERS = {
    "laguna": ("vllm_laguna.tiny.laguna", "LagunaTiny", "build_laguna"),
    "lfm2": ("vllm_laguna.tiny.lfm2", "Lfm2Tiny", "build_lfm2"),
    "llama4": ("vllm_laguna.tiny.llama4", "Llama4Tiny", "build_llama4"),
}


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vllm_laguna.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(BUILDERS))
    parser.add_argument("out_dir")
    parser.add_argument("--preset", default="default", help="named spec (default: 'default')")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="override a spec field")
    parser.add_argument("--quantize", choices=sorted(SCHEMES), help="routed experts quantized (Laguna, Llama 4)")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    parser.add_argument(
        "--linears", action="store_true", help="with --quantize: every other linear too (attention, dense, shared)"
    )
    args = parser.parse_args(argv)
    if args.quantize and args.model not in QUANTIZABLE:
        parser.error(f"--quantize: {' and '.join(QUANTIZABLE)} only")

    module_name, spec_name, builder_name = BUILDERS[args.model]
    module = importlib.import_module(module_name)
    spec = getattr(module, spec_name).preset(args.preset)
    fields = {f.name for f in dataclasses.fields(spec)}
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            parser.error(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        overrides[key] = _parse_value(value)
    build = getattr(module, builder_name)
    if args.quantize is None:
        print(build(args.out_dir, spec, **overrides))
        return
    overrides |= QUANTIZABLE[args.model]
    out = Path(args.out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        source = build(Path(tmp) / "source", spec, **overrides)
        written = quantize_checkpoint(
            source,
            out,
            out.with_name(f"{out.name}-dequantized"),
            scheme=args.quantize,
            group_size=args.group_size,
            linears=args.linears,
        )
    print(*written, sep="\n")


if __name__ == "__main__":
    main()
