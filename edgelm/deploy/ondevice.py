"""What edgelm runs *on* the device: ``python -m edgelm.deploy.ondevice COMMAND JSON``.

Commands (one JSON object as the argument, one JSON line on stdout):

- ``info``: what makes a run reproducible (CPU model, cores, threads, governor, frequency,
  temperature, memory, package versions, ``uname -m``) and whether this is an emulated board;
- ``check {"bundle"}``: open the bundle as the engine does (checksums, schema, backend import);
- ``generate {"bundle", "prompt" | "ids", "max_new_tokens", "chat", "threads"}``: greedy token ids;
- ``bench {"bundle", "prompt", "new_tokens", "runs", "warmup", "threads", "chat", "sampling"}``: TTFT,
  prefill and decode tokens/s over ``runs`` timed generations after ``warmup``, each summarised
  as median, p10, p90, min and max, plus peak RSS, bundle size and :func:`device_info`.

Stdlib and ``edgelm`` only at import time; the engine (numpy, the format's runtime) is imported
by the commands that need it. An error is one JSON line ``{"error": ..., "type": ...}`` and exit 1.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

EMULATION_MARKER = "/etc/edgelm-emulated"
PACKAGES = ("edgelm", "numpy", "tokenizers", "jinja2", "click", "onnxruntime", "ai-edge-litert", "tflite-runtime",
            "executorch", "torch")
# /proc/cpuinfo on ARM names the core by implementer and part number only.
ARM_PARTS = {
    ("0x41", "0xd03"): "Cortex-A53", ("0x41", "0xd04"): "Cortex-A35", ("0x41", "0xd05"): "Cortex-A55",
    ("0x41", "0xd07"): "Cortex-A57", ("0x41", "0xd08"): "Cortex-A72", ("0x41", "0xd09"): "Cortex-A73",
    ("0x41", "0xd0a"): "Cortex-A75", ("0x41", "0xd0b"): "Cortex-A76", ("0x41", "0xd0d"): "Cortex-A77",
    ("0x41", "0xd41"): "Cortex-A78", ("0x41", "0xd44"): "Cortex-X1", ("0x41", "0xd46"): "Cortex-A510",
    ("0x41", "0xd47"): "Cortex-A710", ("0x41", "0xd48"): "Cortex-X2", ("0x41", "0xd4d"): "Cortex-A715",
    ("0x41", "0xd4e"): "Cortex-X3", ("0x41", "0xd80"): "Cortex-A520", ("0x41", "0xd81"): "Cortex-A720",
    ("0x41", "0xd82"): "Cortex-X4", ("0x41", "0xd0c"): "Neoverse-N1", ("0x41", "0xd40"): "Neoverse-V1",
    ("0x41", "0xd49"): "Neoverse-N2", ("0x41", "0xd4f"): "Neoverse-V2",
}


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip().strip("\0")
    except OSError:
        return None


def summarize(values: list[float]) -> dict[str, float]:
    """median, p10, p90 (linear interpolation between order statistics), min, max, mean."""
    v = sorted(values)
    if not v:
        return {}

    def pct(p: float) -> float:
        k = (len(v) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)

    return {"median": statistics.median(v), "p10": pct(0.10), "p90": pct(0.90), "min": v[0], "max": v[-1],
            "mean": statistics.fmean(v)}


def _cpu() -> dict[str, Any]:
    info: dict[str, Any] = {}
    text = _read("/proc/cpuinfo") or ""
    parts: dict[str, int] = {}
    impl = None
    for line in text.splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if key in ("model name", "Model", "Hardware", "vendor_id") and key not in info:
            info[key] = value
        elif key == "CPU implementer":
            impl = value
        elif key == "CPU part":
            name = ARM_PARTS.get((impl or "", value.lower()), f"{impl}/{value}")
            parts[name] = parts.get(name, 0) + 1
    if parts:
        info["cores_by_part"] = parts
    model = _read("/proc/device-tree/model") or _read("/sys/firmware/devicetree/base/model")
    if model:
        info["board"] = model
    info["cpu"] = info.get("model name") or ", ".join(f"{n}x {p}" for p, n in parts.items()) or \
        info.get("Hardware") or platform.processor() or "?"
    return info


def _freq_and_governor() -> dict[str, Any]:
    out: dict[str, Any] = {}
    governors = {}
    for path in sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor")):
        gov = _read(path)
        if gov:
            governors[gov] = governors.get(gov, 0) + 1
    if governors:
        out["governor"] = ",".join(sorted(governors)) if len(governors) > 1 else next(iter(governors))
    cur, mx = [], []
    for path in sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq")):
        v = _read(path)
        if v and v.isdigit():
            cur.append(int(v) // 1000)
    for path in sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/cpuinfo_max_freq")):
        v = _read(path)
        if v and v.isdigit():
            mx.append(int(v) // 1000)
    if cur:
        out["cur_freq_mhz"] = sorted(set(cur))
    if mx:
        out["max_freq_mhz"] = sorted(set(mx))
    return out


def temperatures() -> dict[str, float]:
    """Thermal zones readable without privileges, in degrees Celsius."""
    temps = {}
    for zone in sorted(glob.glob("/sys/class/thermal/thermal_zone*")):
        t = _read(f"{zone}/temp")
        if t and t.lstrip("-").isdigit():
            name = _read(f"{zone}/type") or os.path.basename(zone)
            temps[name if name not in temps else f"{name}:{os.path.basename(zone)}"] = int(t) / 1000
    return temps


def emulation() -> tuple[bool, str]:
    """(emulated, why): the board's marker or env, or an aarch64 userland on an x86 kernel."""
    reasons = []
    if os.environ.get("EDGELM_EMULATED"):
        reasons.append(f"EDGELM_EMULATED={os.environ['EDGELM_EMULATED']}")
    marker = _read(EMULATION_MARKER)
    if marker is not None:
        reasons.append(f"{EMULATION_MARKER}: {marker}")
    cpuinfo = _read("/proc/cpuinfo") or ""
    if platform.machine() in ("aarch64", "arm64", "armv7l") and any(
            v in cpuinfo for v in ("GenuineIntel", "AuthenticAMD")):
        reasons.append(f"{platform.machine()} userland on an x86 CPU (qemu-user)")
    return bool(reasons), "; ".join(reasons)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    import edgelm

    out.setdefault("edgelm", edgelm.__version__)
    return out


def _meminfo() -> dict[str, int]:
    out = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            out[key.lower() + "_mb"] = int(rest.split()[0]) // 1024
    return out


def device_info() -> dict[str, Any]:
    """What makes a device run reproducible, read on the device."""
    import edgelm
    from edgelm.runtime import hugepages

    u = os.uname()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    emulated, why = emulation()
    info: dict[str, Any] = {
        "machine": platform.machine(), "system": u.sysname, "kernel": u.release, "hostname": u.nodename,
        "python": platform.python_version(), "python_executable": sys.executable,
        "cores": os.cpu_count(), "cores_usable": affinity, **_cpu(), **_freq_and_governor(), **_meminfo(),
        "temperature_c": temperatures(), "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": _versions(), "edgelm_path": os.path.dirname(edgelm.__file__),
        "emulated": emulated, "huge_pages": hugepages.describe(),
    }
    if emulated:
        info["emulation"] = why
    os_release = _read("/etc/os-release") or ""
    for line in os_release.splitlines():
        if line.startswith("PRETTY_NAME="):
            info["os"] = line.split("=", 1)[1].strip('"')
    return info


def peak_rss_mb() -> float:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


# --------------------------------------------------------------------------- commands


def cmd_info(args: dict[str, Any]) -> dict[str, Any]:
    return device_info()


def cmd_check(args: dict[str, Any]) -> dict[str, Any]:
    from edgelm.runtime import Engine

    t = time.perf_counter()
    engine = Engine.load(args["bundle"], threads=args.get("threads"))
    m = engine.manifest
    return {"ok": True, "bundle": str(engine.root), "format": m.format, "scheme": m.scheme,
            "load_s": time.perf_counter() - t, "threads": getattr(engine.backend, "threads", None),
            "edgelm_path": os.path.dirname(sys.modules["edgelm"].__file__), "machine": platform.machine()}


def _prompt_ids(engine, args: dict[str, Any]) -> list[int]:
    if args.get("ids") is not None:
        return [int(i) for i in args["ids"]]
    chat = args.get("chat", True) and bool(engine.manifest.chat_template)
    return engine.encode_prompt(args["prompt"], chat=chat)


def cmd_generate(args: dict[str, Any]) -> dict[str, Any]:
    from edgelm.runtime import Engine

    engine = Engine.load(args["bundle"], threads=args.get("threads"))
    ids = _prompt_ids(engine, args)
    tokens = list(engine.generate_ids(ids, max_new_tokens=int(args.get("max_new_tokens", 32)),
                                      ignore_eos=bool(args.get("ignore_eos", False))))
    return {"prompt_ids": ids, "tokens": tokens, "text": engine.tokenizer.decode(tokens),
            "stats": engine.last_stats.to_dict(), "machine": platform.machine()}


def cmd_bench(args: dict[str, Any]) -> dict[str, Any]:
    """Like :func:`edgelm.bench.bench_bundle`, with p10/p90 and the device's facts."""
    from edgelm.bench import DEFAULT_PROMPT, row_name_and_size, sampling_label
    from edgelm.runtime import Engine
    from edgelm.sampling import SamplingConfig

    runs, warmup = int(args.get("runs", 5)), int(args.get("warmup", 1))
    new_tokens, threads = int(args.get("new_tokens", 64)), args.get("threads")
    before = temperatures()
    t = time.perf_counter()
    draft_tokens = int(args.get("draft_tokens", 5))
    sampling = args.get("sampling") or None
    engine = Engine.load(args["bundle"], threads=threads, draft=args.get("draft"), draft_tokens=draft_tokens,
                         lookup=int(args.get("lookup", 0)))
    load_s = time.perf_counter() - t
    ids = _prompt_ids(engine, {"prompt": args.get("prompt") or DEFAULT_PROMPT, **args})
    keys = ["ttft_s", "prefill_tps", "decode_tps", "overhead_share", "total_s"]
    if engine.speculative:
        keys.append("acceptance")
    samples: dict[str, list[float]] = {k: [] for k in keys}
    first_tokens: list[int] = []
    wall = time.perf_counter()
    for i in range(warmup + runs):
        engine.reset()  # every run prefills the whole prompt
        toks = list(engine.generate_ids(ids, max_new_tokens=new_tokens, ignore_eos=True,
                                        sampling=SamplingConfig(**sampling) if sampling else None))
        if i == 0:
            first_tokens = toks
        if i >= warmup:
            s = engine.last_stats
            for k in samples:
                samples[k].append(getattr(s, k))
    wall = time.perf_counter() - wall
    m = engine.manifest
    name, size = row_name_and_size(engine)
    name += sampling_label(sampling)
    bundle_mb = sum(f["size"] for e in (engine, engine.draft) if e is not None for f in e.manifest.files.values()) / 1e6
    info = device_info()
    result = {
        "name": name, "kind": "bundle", "bundle": str(engine.root), "format": m.format,
        "scheme": m.scheme, "threads": getattr(engine.backend, "threads", threads), "prompt_tokens": len(ids),
        "new_tokens": new_tokens, "runs": runs, "warmup": warmup, "load_s": load_s, "bench_wall_s": wall,
        **{k: summarize(v) for k, v in samples.items()}, "samples": samples,
        "peak_rss_mb": peak_rss_mb(), "size_mb": size / 1e6,
        "bundle_mb": bundle_mb,
        **({"sampling": sampling, "tokens": first_tokens} if sampling else {"greedy_tokens": first_tokens}),
        "temperature_before_c": before, "device": info,
        "emulated": info["emulated"],
    }
    if info["emulated"]:
        result["warning"] = ("EMULATED: these timings come from qemu-user emulation of aarch64 on another CPU; "
                             "they show correctness and relative cost, not device speed")
    return result


COMMANDS = {"info": cmd_info, "check": cmd_check, "generate": cmd_generate, "bench": cmd_bench}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(json.dumps({"error": f"usage: python -m edgelm.deploy.ondevice {{{','.join(COMMANDS)}}} [JSON]",
                          "type": "UsageError"}))
        return 2
    try:
        args = json.loads(argv[1]) if len(argv) > 1 else {}
        result = COMMANDS[argv[0]](args)
    except Exception as e:  # reported to the host as one JSON line
        print(json.dumps({"error": str(e), "type": type(e).__name__}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from edgelm.runtime.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages()
    sys.exit(main(sys.argv[1:]))
