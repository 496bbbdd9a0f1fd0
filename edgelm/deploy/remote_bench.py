"""Benchmarks on a device: deploy a bundle, time it there, bring back one JSON result.

:func:`bench_on_device` runs ``python -m edgelm.deploy.ondevice bench`` in the device's venv:
warm-up, then ``runs`` timed greedy generations of exactly ``new_tokens`` tokens; TTFT, prefill
and decode tokens/s as median, p10, p90, min and max; peak RSS; bundle size; and what makes the
run reproducible, read on the device (CPU model, cores, threads, governor, frequency,
temperature, package versions, ``uname -m``). A run on an emulated board says
``"emulated": true`` and carries a warning: it is not device speed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgelm.deploy.deploy import Layout, OnDeviceError, Progress, deploy, run_ondevice
from edgelm.deploy.transports import DeviceError, Transport, open_transport

__all__ = ["bench_on_device", "format_device_table", "device_info_remote", "describe_device", "write_report",
           "EMULATED_NOTE"]

EMULATED_NOTE = ("EMULATED BOARD: qemu-user runs aarch64 code on another CPU; the timings check that the "
                 "path works and compare rows with each other, they are not device speed")


def bench_on_device(bundle: str | Path, url: str, *, workdir: str | None = None, install: bool = True,
                    ssh_config: str | Path | None = None, python: str | None = None, prompt: str | None = None,
                    new_tokens: int = 64, runs: int = 5, warmup: int = 1, threads: int | None = None,
                    chat: bool = True, connect_timeout: float = 10, timeout: float | None = 3600,
                    pip_args: Sequence[str] = (), progress: Progress | None = None,
                    transport: Transport | None = None, draft: str | Path | None = None,
                    draft_tokens: int = 5, lookup: int = 0, sampling: dict[str, Any] | None = None) -> dict[str, Any]:
    """Deploy ``bundle`` to ``url`` (unchanged files are skipped) and benchmark it there
    (speculatively, with ``draft`` deployed beside it or with prompt lookup, when given; sampling
    with ``sampling``'s :class:`~edgelm.sampling.SamplingConfig` fields instead of greedy)."""
    t = transport or open_transport(url, ssh_config=ssh_config, connect_timeout=connect_timeout)
    d = deploy(bundle, url, workdir, install, python=python, pip_args=pip_args, progress=progress, transport=t)
    layout = Layout(d.workdir)
    args = {"bundle": d.bundle, "new_tokens": new_tokens, "runs": runs, "warmup": warmup, "threads": threads,
            "chat": chat}
    if draft is not None:
        dd = deploy(draft, url, d.workdir, install=False, python=python, progress=progress, transport=t)
        args.update(draft=dd.bundle, draft_tokens=draft_tokens)
    elif lookup:
        args.update(lookup=lookup, draft_tokens=draft_tokens)
    if prompt:
        args["prompt"] = prompt
    if sampling:
        args["sampling"] = sampling
    if progress:
        progress(f"benchmarking on {t}: {warmup} warm-up + {runs} runs of {new_tokens} tokens")
    t0 = time.perf_counter()
    try:
        result = run_ondevice(t, layout, "bench", args, timeout=timeout)
    except OnDeviceError as e:
        raise DeviceError(f"benchmark failed {e}") from e
    result["device_url"] = str(t)
    result["transport"] = t.url.scheme
    result["remote_wall_s"] = time.perf_counter() - t0
    result["deploy"] = {"sent": d.sent, "skipped": d.skipped, "installed": d.installed, "timings": d.timings}
    result["local_bundle"] = str(bundle)
    if result.get("emulated"):
        result["name"] += " (emulated)"
    return result


def device_info_remote(t: Transport, workdir: str) -> dict[str, Any]:
    """The device's reproducibility facts (needs a deployed workdir)."""
    return run_ondevice(t, Layout(t.resolve(workdir)), "info", {})


def _fmt(d: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    return f"{d['median'] * scale:.{digits}f} ({d['p10'] * scale:.{digits}f}–{d['p90'] * scale:.{digits}f})"


def format_device_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of device rows: medians with (p10–p90)."""
    lines = ["| row | device | size MB | peak RSS MB | TTFT ms (p10–p90) | prefill tok/s (p10–p90) | "
             "decode tok/s (p10–p90) |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        dev = r.get("device", {})
        where = f"{r.get('device_url', '?')} {dev.get('machine', '?')}{' EMULATED' if r.get('emulated') else ''}"
        lines.append(f"| {r['name']} | {where} | {r['size_mb']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{_fmt(r['ttft_s'], 1e3, 0)} | {_fmt(r['prefill_tps'], 1, 0)} | {_fmt(r['decode_tps'])} |")
    return "\n".join(lines)


def describe_device(info: dict[str, Any], threads: Any = None) -> str:
    """One line: CPU, cores, threads, governor, temperature, Python, runtime versions."""
    parts = [f"{info.get('machine', '?')} {info.get('cpu', '?')}", f"{info.get('cores', '?')} cores"]
    if info.get("emulated"):
        parts.insert(0, "EMULATED (qemu-user)")
    if threads:
        parts.append(f"{threads} threads")
    if info.get("board"):
        parts.insert(0, info["board"])
    if info.get("governor"):
        parts.append(f"governor {info['governor']}")
    if info.get("huge_pages"):
        parts.append(f"huge pages {info['huge_pages']}")
    temps = info.get("temperature_c") or {}
    if temps:
        parts.append("temp " + ", ".join(f"{k} {v:.0f}C" for k, v in list(temps.items())[:2]))
    parts.append(f"Python {info.get('python', '?')}")
    v = info.get("versions", {})
    parts.append(", ".join(f"{k} {v[k]}" for k in ("onnxruntime", "ai-edge-litert", "executorch", "torch") if k in v))
    return "; ".join(p for p in parts if p)


def device_report(results: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"emulated": any, "rows": results}`` (+ the emulation warning): the JSON form of a device bench."""
    report: dict[str, Any] = {"emulated": any(r.get("emulated") for r in results), "rows": results}
    if report["emulated"]:
        report["warning"] = EMULATED_NOTE
    return report


def write_report(results: list[dict[str, Any]], path: str | Path) -> Path:
    """Write :func:`device_report` as JSON to ``path``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(device_report(results), indent=2) + "\n")
    return p
