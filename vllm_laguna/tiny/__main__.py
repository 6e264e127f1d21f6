"""``python -m vllm_laguna.tiny MODEL OUT_DIR [--preset NAME] [--set FIELD=JSON ...]``

Writes a tiny checkpoint with random weights (config, safetensors in the Hub layout,
tokenizer, chat template). ``--set`` overrides any field of the model's spec dataclass, the
value parsed as JSON when it parses (``--set layout='"transformers"'`` or
``--set layout=transformers`` both work), e.g.::

    python -m vllm_laguna.tiny laguna /tmp/laguna --set gating='"per-element"' --set router_softcap=1.0
    python -m vllm_laguna.tiny laguna /tmp/xs2 --preset xs2-scaled
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json

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
    args = parser.parse_args(argv)

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
    out = getattr(module, builder_name)(args.out_dir, spec, **overrides)
    print(out)


if __name__ == "__main__":
    main()
