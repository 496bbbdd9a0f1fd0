"""On the device: deploy, same greedy tokens as the host, latency report, and the failure modes.

See conftest.py for the options; every test skips without --device.
"""

from __future__ import annotations

import json
import shutil

import pytest

from edgelm.bench import DEFAULT_PROMPT


def test_device_answers(transport, report):
    out = transport.run(["uname", "-m"]).stdout.strip()
    assert out in ("aarch64", "arm64", "x86_64", "armv7l", "armv8l"), out
    report.data["checks"]["uname_m"] = out


def test_deploy_verifies_and_redeploy_skips(deployed, host_bundle, deploy_kwargs, report, do_deploy):
    assert deployed.check["ok"] and deployed.check["format"] == deployed.format
    assert deployed.check["edgelm_path"].startswith(deployed.workdir)  # the copied runtime runs there
    again = do_deploy(host_bundle, deploy_kwargs, install=False)
    assert again.sent == [] and again.runtime_files_sent == 0 and again.installed == []
    report.data["deploy"]["again"] = {"timings": again.timings, "skipped": again.skipped}


def test_greedy_tokens_match_the_host(deployed, transport, host_bundle, report):
    from edgelm.deploy.deploy import Layout, run_ondevice
    from edgelm.runtime import Engine

    host = Engine.load(host_bundle)
    ids = host.encode_prompt(DEFAULT_PROMPT, chat=bool(host.manifest.chat_template))
    want = list(host.generate_ids(ids, max_new_tokens=24, ignore_eos=True))
    got = run_ondevice(transport, Layout(deployed.workdir), "generate",
                       {"bundle": deployed.bundle, "ids": ids, "max_new_tokens": 24, "ignore_eos": True},
                       timeout=1800)
    report.data["checks"]["greedy"] = {"host": want, "device": got["tokens"], "equal": got["tokens"] == want,
                                       "device_machine": got["machine"]}
    assert got["tokens"] == want


def test_chat_on_the_device(deployed, transport, host_bundle, report):
    """`edgelm chat`, run there as `edgelm deploy` says to: two turns piped in, the host's answers back,
    the second turn run from the KV cache the first left."""
    from edgelm.deploy.transports import Transport
    from edgelm.runtime import Engine

    messages = ["hello", "and then?"]
    chat = Engine.load(host_bundle).chat()
    want = "".join(chat.ask(m, max_new_tokens=8) + "\n" for m in messages)
    script = Transport.script([deployed.python, "-m", "edgelm.cli", "chat", deployed.bundle, "-n", "8", "--stats"],
                              cwd=deployed.workdir, env={"PYTHONIOENCODING": "utf-8"})
    proc = transport.shell(script, input="".join(m + "\n" for m in messages), timeout=1800, what="edgelm chat")
    want = want.replace("\r\n", "\n").replace("\r", "\n")  # text mode reads \r as a newline
    report.data["checks"]["chat"] = {"equal": proc.stdout == want, "stats": proc.stderr.strip().splitlines()}
    assert proc.stdout == want
    assert proc.stderr.count("already in the KV cache") >= 1, proc.stderr


def test_latency_report(request, deployed, transport, host_bundle, report):
    from edgelm.deploy.remote_bench import bench_on_device, describe_device, format_device_table

    result = bench_on_device(host_bundle, str(transport), transport=transport, workdir=deployed.workdir,
                             install=False, new_tokens=request.config.getoption("--bench-tokens"),
                             runs=request.config.getoption("--bench-runs"), warmup=1, timeout=3600)
    report.data["bench"] = result
    print("\n" + describe_device(result["device"], result["threads"]) + "\n" + format_device_table([result]))
    for key in ("ttft_s", "prefill_tps", "decode_tps"):
        assert set(result[key]) >= {"median", "p10", "p90", "min", "max"}
        assert result[key]["median"] > 0
    assert result["peak_rss_mb"] > 0 and result["size_mb"] > 0
    info = result["device"]
    assert info["machine"] and info["cores"] and "versions" in info
    assert result["emulated"] == deployed.emulated == info["emulated"]
    if result["emulated"]:
        assert "EMULATED" in result["warning"] and result["name"].endswith("(emulated)")


def test_damaged_file_on_the_device_is_caught_then_repaired(deployed, transport, host_bundle, deploy_kwargs, do_deploy):
    from edgelm.deploy import DeployError, verify_on_device
    from edgelm.deploy.deploy import Layout

    name = "damaged-copy"
    first = do_deploy(host_bundle, deploy_kwargs, name=name, install=False)
    model = json.loads((host_bundle / "edgelm.json").read_text())["model_file"]
    target = f"{first.bundle}/{model}"
    flip = ("import sys; p = sys.argv[1]; b = bytearray(open(p, 'rb').read()); b[len(b) // 2] ^= 0xFF; "
            "open(p, 'wb').write(bytes(b))")
    transport.run([first.python, "-c", flip, target])  # same size, different bytes
    with pytest.raises(DeployError) as e:
        verify_on_device(transport, Layout(first.workdir), first.bundle)
    assert "failed its check on the device" in str(e.value) and model in str(e.value)
    fixed = do_deploy(host_bundle, deploy_kwargs, name=name, install=False)
    assert fixed.sent == [model] and fixed.check["ok"]


def test_bundle_path_with_spaces(deployed, transport, host_bundle, deploy_kwargs, tmp_path, do_deploy):
    from edgelm.deploy.deploy import Layout, run_ondevice

    spaced = tmp_path / "my bundles" / "tiny bundle (spaces)"
    shutil.copytree(host_bundle, spaced)
    r = do_deploy(spaced, deploy_kwargs, install=False)
    assert r.bundle.endswith("/bundles/tiny bundle (spaces)") and r.check["ok"]
    out = run_ondevice(transport, Layout(r.workdir), "generate",
                       {"bundle": r.bundle, "prompt": "hello there", "max_new_tokens": 4, "ignore_eos": True})
    assert len(out["tokens"]) == 4


def test_device_without_that_python_is_explained(deployed, host_bundle, deploy_kwargs, do_deploy):
    from edgelm.deploy import DeployError

    with pytest.raises(DeployError, match="no Python on"):
        do_deploy(host_bundle, deploy_kwargs, python="python3-not-on-this-device")


def test_no_install_names_what_is_missing(deployed, transport, host_bundle, deploy_kwargs, do_deploy):
    from edgelm.deploy import DeployError

    fresh = f"{deployed.workdir}/no-install-check"  # inside the session's workdir; nothing is written there
    with pytest.raises(DeployError) as e:
        do_deploy(host_bundle, {**deploy_kwargs, "workdir": fresh}, install=False)
    assert "no working venv" in str(e.value) and "pip install" in str(e.value)
    assert transport.shell(f"test -e '{fresh}'", check=False).returncode != 0


def test_int8_kv_cache_on_the_device(deployed, transport, host_bundle, deploy_kwargs, do_deploy, tiny_converter,
                                    tmp_path, report):
    """The tiny model converted again with an int8 KV cache (in an .onnx: int8 codes and float32 scales as graph
    inputs; in a .pte: mutable buffers, attended by ExecuTorch's kernels or, with portable attention, by plain ops)
    runs in the device's runtime and gives the host's greedy tokens."""
    from edgelm.config import INT8_KV_FORMATS
    from edgelm.deploy.deploy import Layout, run_ondevice
    from edgelm.runtime import Engine

    fmt = deployed.format
    if fmt not in INT8_KV_FORMATS:
        pytest.skip(f"a {fmt} bundle holds no int8 KV cache")
    options = {"kv_cache": "int8"}
    if fmt == "pte":  # the host bundle's attention: a portable .pte for an ARMv8.0 board
        options["pte_attention"] = Engine.load(host_bundle).manifest.io.get("attention", "custom")
    bundle = tiny_converter(tmp_path / f"tiny-{fmt}-kv8", fmt, **options)
    there = do_deploy(bundle, deploy_kwargs, install=False)
    host = Engine.load(bundle)
    ids = host.encode_prompt(DEFAULT_PROMPT, chat=bool(host.manifest.chat_template))
    want = list(host.generate_ids(ids, max_new_tokens=24, ignore_eos=True))
    got = run_ondevice(transport, Layout(there.workdir), "generate",
                       {"bundle": there.bundle, "ids": ids, "max_new_tokens": 24, "ignore_eos": True}, timeout=1800)
    report.data["checks"]["int8_kv_cache_greedy"] = {"equal": got["tokens"] == want, "device_machine": got["machine"]}
    assert got["tokens"] == want
