"""The target memory estimate against the measured peak RSS of real bundles.

    python scripts/memory_estimate.py BUNDLE... [--target x86-64]

Each bundle loads in a fresh process, prefills a chat prompt and generates 8 tokens; its peak
RSS is printed next to what ``edgelm.targets.estimate_memory`` says for the same model, format,
scheme, context, prefill chunk and signatures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from edgelm.config import ModelConfig
from edgelm.targets import estimate_memory, load_profile

CHILD = """
import json, resource, sys
from edgelm.runtime import Engine
engine = Engine.load(sys.argv[1], threads=2, verify=False)
prompt = engine.encode_prompt("Tell me about the sea.", chat=True)
ids = list(engine.generate_ids(prompt, max_new_tokens=8, ignore_eos=True))
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "tokens": len(ids)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--target", default="x86-64", help="profile whose memory model to use (default: x86-64)")
    args = ap.parse_args()
    base = load_profile(args.target)
    print("| bundle | format | scheme | measured MB | estimated MB | ratio |\n|---|---|---|---:|---:|---:|")
    for bundle in args.bundles:
        m = json.loads((bundle / "edgelm.json").read_text())
        scheme = (m["io"].get("quantization") or {}).get("scheme", "fp32")
        out = subprocess.run([sys.executable, "-c", CHILD, str(bundle)], capture_output=True, text=True, check=True)
        measured = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
        profile = dataclasses.replace(base, convert=dataclasses.replace(base.convert,
                                                                        max_prefill=int(m["io"]["max_prefill"])))
        est = estimate_memory(profile, ModelConfig.from_dict(m["model"]), scheme, m["max_context"], m["format"],
                              m["io"].get("prefill_lengths"))
        mb = est.total_bytes / 2 ** 20
        print(f"| {bundle.name} | {m['format']} | {scheme} | {measured:.0f} | {mb:.0f} | {mb / measured:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
