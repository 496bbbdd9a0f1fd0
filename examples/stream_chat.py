"""Stream a chat answer from a bundle with the device-side API (no torch needed for onnx/tflite).

    python examples/stream_chat.py bundles/smollm2-pte "Tell me a fun fact about octopuses."
"""

import sys

from edgelm.runtime import Engine, SamplingConfig

bundle, prompt = sys.argv[1], " ".join(sys.argv[2:]) or "Hello!"
engine = Engine.load(bundle)
messages = [{"role": "user", "content": prompt}]
for piece in engine.generate(messages, max_new_tokens=200, sampling=SamplingConfig(temperature=0.6, seed=0)):
    print(piece, end="", flush=True)
s = engine.last_stats
print(f"\n[{s.generated_tokens} tokens, {s.decode_tps:.1f} tokens/s, first token after {s.ttft_s * 1e3:.0f} ms]")
