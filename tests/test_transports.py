"""Transports and deploy on the host: URL checks, argv construction, the real adb client, and a
real OpenSSH server on loopback (started here when openssh-server is installed) for deploy,
checksum skip, a damaged file on the "device", and the failure modes. No mocks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgelm.deploy import DeployError, deploy, verify_on_device
from edgelm.deploy.deploy import Layout, requirements, runtime_sources
from edgelm.deploy.transports import (
    AdbTransport,
    DeviceError,
    DeviceUnreachableError,
    DeviceURL,
    DeviceURLError,
    LocalTransport,
    SSHTransport,
    Transport,
    open_transport,
    parse_device_url,
)
from edgelm.runtime.hugepages import huge_pages_env

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
NASTY = "it's a \"test\" $(touch /tmp/pwned) `id`; rm -rf ~ && echo *|x > y\\z"


# --------------------------------------------------------------------------- URLs


@pytest.mark.parametrize("url, want", [
    ("local", DeviceURL("local")),
    ("ssh://pi@raspberrypi.local", DeviceURL("ssh", host="raspberrypi.local", user="pi")),
    ("ssh://user@192.168.1.20:2222", DeviceURL("ssh", host="192.168.1.20", user="user", port=2222)),
    ("ssh://edgelm-board", DeviceURL("ssh", host="edgelm-board")),
    ("ssh://[::1]:22", DeviceURL("ssh", host="::1", port=22)),
    ("my_pi", DeviceURL("ssh", host="my_pi")),
    ("pi@board-1", DeviceURL("ssh", host="board-1", user="pi")),
    ("adb://emulator-5554", DeviceURL("adb", serial="emulator-5554")),
    ("adb://192.168.1.30:5555", DeviceURL("adb", serial="192.168.1.30:5555")),
    ("adb://", DeviceURL("adb")),
])
def test_parse_valid_urls(url, want):
    assert parse_device_url(url) == want
    assert parse_device_url(str(want)) == want  # round trip


@pytest.mark.parametrize("url, needle", [
    ("ssh://host;reboot", "';'"),
    ("ssh://$(id)@host", "'$'"),
    ("ssh://host|nc", "'|'"),
    ("ssh://a`id`", "'`'"),
    ("ssh://h&&x", "'&'"),
    ("ssh://-oProxyCommand=touch_x", "start with '-'"),
    ("-oProxyCommand=x", "start with '-'"),
    ("ssh://pi@host:99999", "port"),
    ("ssh://pi@host:22x", "port"),
    ("ssh://host/home/pi", "no path"),
    ("ssh://pi @host", "whitespace"),
    ("ssh://pi:s3cret@host", "never passes passwords"),
    ("ssh://host\nid", "whitespace"),
    ("ssh://", "no host"),
    ("host:22", "ssh://host:22"),
    ("adb://abc;reboot", "';'"),
    ("adb://-s", "not allowed"),
    ("ftp://host", "unknown transport"),
    ("", "no device"),
])
def test_parse_rejects_unsafe_urls(url, needle):
    with pytest.raises(DeviceURLError) as e:
        parse_device_url(url)
    assert needle in str(e.value)
    assert "s3cret" not in str(e.value)  # a password never reaches a message


# --------------------------------------------------------------------------- argv construction


def test_ssh_argv_is_a_list_with_batchmode_and_quoted_script(tmp_path):
    cfg = tmp_path / "ssh config"
    cfg.write_text("Host x\n")
    t = SSHTransport(parse_device_url("ssh://pi@rpi.local:2222"), ssh_config=cfg, connect_timeout=7)
    script = Transport.script(["ls", "-l", "/home/pi/my bundles/it's"], cwd="/home/pi/edge lm",
                              env={"PYTHONPATH": "/home/pi/edge lm/src"})
    assert script == ("cd '/home/pi/edge lm' && PYTHONPATH='/home/pi/edge lm/src' ls -l "
                      "'/home/pi/my bundles/it'\"'\"'s'")
    argv = t.command(script)
    assert argv[:3] == ["ssh", "-F", str(cfg)]
    assert argv[-3:] == ["--", "rpi.local", script]
    opts = argv[argv.index("-F") + 2:argv.index("--")]
    assert "BatchMode=yes" in opts and "ConnectTimeout=7" in opts
    assert opts[opts.index("-l") + 1] == "pi" and opts[opts.index("-p") + 1] == "2222"
    assert not any("assword" in a for a in argv)


def test_ssh_alias_without_user_or_port_leaves_them_to_ssh_config():
    argv = open_transport("edgelm-board").command("true")
    assert "-l" not in argv and "-p" not in argv and "-F" not in argv
    assert argv[-2:] == ["edgelm-board", "true"]


def test_ssh_config_must_exist(tmp_path):
    with pytest.raises(DeviceError, match="does not exist"):
        open_transport("ssh://h", ssh_config=tmp_path / "nope")


def test_adb_argv_and_push_commands(tmp_path):
    t = AdbTransport(parse_device_url("adb://emulator-5554"), server_port=5999)
    assert t.command("echo hi") == ["adb", "-P", "5999", "-s", "emulator-5554", "shell", "echo hi"]
    f = tmp_path / "model file.onnx"
    f.write_bytes(b"x")
    cmds = t.push_commands([(f, "bundles/my bundle/model file.onnx")], "/data/local/tmp/edgelm")
    assert cmds[0][-2:] == ["shell", "mkdir -p '/data/local/tmp/edgelm/bundles/my bundle'"]
    assert cmds[1][-3:] == ["push", str(f), "/data/local/tmp/edgelm/bundles/my bundle/model file.onnx"]
    assert AdbTransport(parse_device_url("adb://")).command("true") == ["adb", "shell", "true"]


def test_push_refuses_paths_outside_the_workdir(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    for bad in ("../escape", "/etc/passwd", "a/../../b", "a//b"):
        with pytest.raises(DeviceError, match="plain relative path"):
            LocalTransport().push([(f, bad)], str(tmp_path / "work"))
        with pytest.raises(DeviceError, match="plain relative path"):
            AdbTransport(parse_device_url("adb://x")).push_commands([(f, bad)], "/data/local/tmp/w")


def test_local_transport_round_trips_hostile_strings(tmp_path):
    t = LocalTransport()
    d = tmp_path / "dir with 'quotes' and $x"
    d.mkdir()
    out = t.run(["printf", "%s", NASTY], cwd=str(d)).stdout
    assert out == NASTY
    assert t.run(["pwd"], cwd=str(d)).stdout.strip() == str(d)
    assert not Path("/tmp/pwned").exists()


def test_requirements_follow_the_format_and_pin_pte():
    from edgelm.bundle import Manifest
    from edgelm.config import ModelConfig

    cfg = ModelConfig(arch="llama", vocab_size=8, dim=8, n_layers=1, n_heads=[1], n_kv_heads=[1], ffn_dim=[8],
                      head_dim=8)
    m = Manifest(format="pte", model_file="model.pte", model=cfg,
                 versions={"executorch": "1.5.1", "torch": "2.13.0+cpu"})
    specs = [s for s, _ in requirements(m)]
    assert specs == ["numpy", "tokenizers", "jinja2", "click", "executorch==1.5.1", "torch==2.13.0"]
    m.format = "tflite"
    reqs = dict(requirements(m, (3, 10)))
    assert [a[0] for a in reqs["ai-edge-litert"]] == ["ai-edge-litert", "tflite-runtime"] and "tomli" in reqs


def test_runtime_sources_are_the_device_side_only():
    names = [rel for _, rel in runtime_sources()]
    assert "edgelm/runtime/engine.py" in names and "edgelm/deploy/ondevice.py" in names
    assert "edgelm/targets/raspberry-pi-5.toml" in names
    assert not any("converters" in n or "__pycache__" in n for n in names)


def test_deploy_module_imports_without_torch():
    code = ("import sys, edgelm.deploy, edgelm.deploy.ondevice, edgelm.deploy.commands; "
            "print([m for m in ('torch', 'executorch', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- the real adb client


@pytest.fixture
def adb_port():
    if not shutil.which("adb"):
        pytest.skip("the adb client is not installed (apt-get install adb)")
    port = _free_port()
    yield port
    subprocess.run(["adb", "-P", str(port), "kill-server"], capture_output=True, timeout=30)  # the server we started


def test_adb_reports_a_missing_device_clearly(adb_port, tmp_path):
    t = AdbTransport(parse_device_url("adb://edgelm-no-such-device"), server_port=adb_port)
    with pytest.raises(DeviceUnreachableError) as e:
        t.state()
    assert "edgelm-no-such-device" in str(e.value) and "adb devices" in str(e.value)
    with pytest.raises(DeviceUnreachableError, match="not found"):
        t.shell("true")
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(DeviceUnreachableError, match="not found"):
        t.push([(f, "f")], "/data/local/tmp/edgelm")
    with pytest.raises(DeviceUnreachableError, match="no device is attached|no devices"):
        AdbTransport(parse_device_url("adb://"), server_port=adb_port).shell("true")


def test_missing_tool_is_a_clear_error():
    t = AdbTransport(parse_device_url("adb://x"), adb="/nonexistent/adb")
    with pytest.raises(DeviceError, match="cannot run"):
        t.shell("true")


# --------------------------------------------------------------------------- a real sshd on loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackSSH:
    """An sshd on 127.0.0.1 with throwaway keys; ``config`` is an ssh config with Host ``dev``."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, _free_port()
        keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", ""]
        subprocess.run([*keygen, "-f", str(root / "host_key")], check=True)
        subprocess.run([*keygen, "-f", str(root / "client_key")], check=True)
        shutil.copy(root / "client_key.pub", root / "authorized_keys")
        (root / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {root}/host_key\nPidFile {root}/sshd.pid\n"
            f"AuthorizedKeysFile {root}/authorized_keys\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nMaxStartups 50:30:100\n")
        host_pub = (root / "host_key.pub").read_text().split()[:2]
        (root / "known_hosts").write_text(f"dev-loopback {' '.join(host_pub)}\n")
        self.config = root / "ssh config"
        self.config.write_text(self._host("dev") + self._host("dev-nokey", key="other_key")
                               + self._host("dev-unknown-host", known="empty_known_hosts"))
        subprocess.run([*keygen, "-f", str(root / "other_key")], check=True)
        (root / "empty_known_hosts").write_text("")
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")],
                                     stdout=subprocess.DEVNULL, stderr=open(root / "sshd.log", "w"))

    def _host(self, name: str, key: str = "client_key", known: str = "known_hosts") -> str:
        return (f"Host {name}\n  HostName 127.0.0.1\n  Port {self.port}\n  User {_user()}\n"
                f"  IdentityFile {self.root}/{key}\n  IdentitiesOnly yes\n  HostKeyAlias dev-loopback\n"
                f"  UserKnownHostsFile {self.root}/{known}\n  StrictHostKeyChecking yes\n")

    def wait(self) -> None:
        t = open_transport("dev", ssh_config=self.config, connect_timeout=5)
        for _ in range(50):
            if self.proc.poll() is not None:
                break
            try:
                t.shell("true")
                return
            except DeviceError:
                time.sleep(0.2)
        self.stop()
        pytest.skip(f"could not start sshd on loopback: {(self.root / 'sshd.log').read_text()[-500:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if SSHD is None or not shutil.which("ssh"):
        pytest.skip("openssh-server and openssh-client are needed (apt-get install openssh-server openssh-client)")
    server = LoopbackSSH(tmp_path_factory.mktemp("sshd"))
    server.wait()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ssh_dev(sshd):
    return open_transport("dev", ssh_config=sshd.config)


def test_ssh_round_trips_hostile_strings(ssh_dev, tmp_path):
    d = tmp_path / "dir with 'quotes'; and $HOME"
    d.mkdir()
    assert ssh_dev.run(["printf", "%s", NASTY], cwd=str(d)).stdout == NASTY
    assert ssh_dev.run(["pwd"], cwd=str(d)).stdout.strip() == str(d)
    assert ssh_dev.resolve("~/edgelm") == os.path.expanduser("~/edgelm")
    files = [(tmp_path / "a b.txt", "sub dir/a b.txt"), (tmp_path / "q'x", "q'x")]
    for f, _ in files:
        f.write_text(f.name)
    ssh_dev.push(files, str(d / "out"))
    assert (d / "out" / "sub dir" / "a b.txt").read_text() == "a b.txt" and (d / "out" / "q'x").exists()
    ssh_dev._has_tar = False  # the no-tar path: one `cat` per file
    ssh_dev.push(files, str(d / "out2"))
    ssh_dev._has_tar = None
    assert (d / "out2" / "sub dir" / "a b.txt").read_text() == "a b.txt"
    assert not Path("/tmp/pwned").exists()


def test_ssh_remote_failure_is_not_a_connection_failure(ssh_dev):
    with pytest.raises(DeviceError) as e:
        ssh_dev.shell("echo oops >&2; exit 3", what="a failing command")
    assert not isinstance(e.value, DeviceUnreachableError) and "oops" in str(e.value) and "exit 3" in str(e.value)
    assert ssh_dev.shell("exit 255", check=False).returncode == 255  # a remote 255 is still the command's


def test_ssh_unreachable_fails_fast(sshd):
    closed = _free_port()
    t0 = time.perf_counter()
    with pytest.raises(DeviceUnreachableError, match="Connection refused.*sshd running"):
        open_transport(f"ssh://127.0.0.1:{closed}", ssh_config=sshd.config).shell("true")
    assert time.perf_counter() - t0 < 5


def test_ssh_connect_timeout_applies_to_a_silent_host(sshd):
    # Something accepts TCP connections but never speaks SSH: ConnectTimeout bounds the wait.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        t0 = time.perf_counter()
        with pytest.raises(DeviceUnreachableError, match="[Tt]imed out"):
            open_transport(f"ssh://127.0.0.1:{port}", ssh_config=sshd.config, connect_timeout=2).shell("true")
        assert time.perf_counter() - t0 < 10


def test_ssh_auth_and_host_key_failures_are_explained(sshd):
    with pytest.raises(DeviceUnreachableError, match="refused every key.*never asks for a password"):
        open_transport("dev-nokey", ssh_config=sshd.config).shell("true")
    with pytest.raises(DeviceUnreachableError, match="host key"):
        open_transport("dev-unknown-host", ssh_config=sshd.config).shell("true")


@pytest.fixture(scope="module")
def deployed(sshd, tiny_pte, tmp_path_factory):
    """tiny_pte deployed over the loopback sshd into a folder whose path has spaces."""
    home = tmp_path_factory.mktemp("device") / "dev home"
    home.mkdir()
    workdir = home / "edge lm"
    result = deploy(tiny_pte, "dev", str(workdir), ssh_config=sshd.config, python=sys.executable,
                    system_site_packages=True)  # the host's runtimes stand in for the device's
    return result, workdir, home


def test_deploy_over_ssh_copies_verifies_and_stays_in_workdir(deployed, tiny_pte):
    r, workdir, home = deployed
    assert sorted(r.sent) == sorted([*json.loads((tiny_pte / "edgelm.json").read_text())["files"], "edgelm.json"])
    assert r.check["ok"] and r.check["format"] == "pte"
    assert r.check["edgelm_path"] == str(workdir / "src" / "edgelm")  # the copied runtime, not the host's
    assert sorted(p.name for p in home.iterdir()) == ["edge lm"]  # nothing written outside the workdir
    assert sorted(p.name for p in workdir.iterdir()) == ["bundles", "src", "tmp", "venv"]
    assert not (workdir / "src" / "edgelm" / "converters").exists()


def test_redeploy_skips_unchanged_files(deployed, sshd, tiny_pte):
    r, workdir, _ = deployed
    again = deploy(tiny_pte, "dev", str(workdir), ssh_config=sshd.config, python=sys.executable, install=False)
    assert again.sent == [] and sorted(again.skipped) == sorted(r.sent) and again.runtime_files_sent == 0
    assert again.installed == []


def test_damaged_file_on_the_device_is_reported_then_repaired(deployed, sshd, tiny_pte):
    r, workdir, _ = deployed
    manifest = json.loads((tiny_pte / "edgelm.json").read_text())
    model = workdir / "bundles" / tiny_pte.name / manifest["model_file"]
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    model.write_bytes(bytes(data))
    t = open_transport("dev", ssh_config=sshd.config)
    with pytest.raises(DeployError) as e:
        verify_on_device(t, Layout(str(workdir)), r.bundle)
    assert "failed its check on the device" in str(e.value) and manifest["model_file"] in str(e.value)
    assert "sha256" in str(e.value)
    fixed = deploy(tiny_pte, "dev", str(workdir), ssh_config=sshd.config, python=sys.executable, install=False)
    assert fixed.sent == [manifest["model_file"]] and fixed.check["ok"]


def test_bundle_path_with_spaces_deploys_and_runs(deployed, sshd, tiny_pte, tmp_path):
    from edgelm.bench import DEFAULT_PROMPT
    from edgelm.deploy.remote_bench import bench_on_device
    from edgelm.runtime import Engine

    _, workdir, _ = deployed
    spaced = tmp_path / "my bundles" / "tiny pte (copy)"
    shutil.copytree(tiny_pte, spaced)
    result = bench_on_device(spaced, "dev", workdir=str(workdir), ssh_config=sshd.config, python=sys.executable,
                             install=False, new_tokens=6, runs=2, warmup=0, threads=1)
    assert result["bundle"] == str(workdir / "bundles" / "tiny pte (copy)")
    assert result["emulated"] is False and result["runs"] == 2 and result["threads"] == 1
    assert result["decode_tps"]["median"] > 0 and result["decode_tps"]["p90"] >= result["decode_tps"]["p10"]
    assert result["device"]["machine"] and result["device"]["versions"]["executorch"]
    if huge_pages_env({}) is not None:  # the device side re-executed itself with the glibc tunable
        assert result["device"]["huge_pages"].startswith("on"), result["device"]
    host = Engine.load(spaced, threads=1)
    ids = host.encode_prompt(DEFAULT_PROMPT, chat=bool(host.manifest.chat_template))
    assert result["greedy_tokens"] == list(host.generate_ids(ids, max_new_tokens=6, ignore_eos=True))


def test_device_without_python_or_venv_is_explained(deployed, sshd, tiny_pte, tmp_path):
    with pytest.raises(DeployError, match="no Python on .*python3-does-not-exist"):
        deploy(tiny_pte, "dev", str(tmp_path / "w"), ssh_config=sshd.config, python="python3-does-not-exist")
    with pytest.raises(DeployError) as e:
        deploy(tiny_pte, "dev", str(tmp_path / "w2"), ssh_config=sshd.config, python=sys.executable,
               install=False)
    msg = str(e.value)
    assert "no working venv" in msg and "--install" in msg and "-m venv" in msg and "pip install" in msg
    assert not (tmp_path / "w2").exists()  # nothing was copied to a device that cannot run the bundle


def test_workdir_must_be_a_folder_of_its_own(sshd, tiny_pte):
    with pytest.raises(DeployError, match="not a folder of its own"):
        deploy(tiny_pte, "dev", "~", ssh_config=sshd.config, python=sys.executable, install=False)


def test_deploy_command_prints_json(deployed, sshd, tiny_pte):
    from click.testing import CliRunner

    from edgelm.deploy.commands import deploy_command

    _, workdir, _ = deployed
    out = CliRunner().invoke(deploy_command, [str(tiny_pte), "--device", "dev", "--ssh-config", str(sshd.config),
                                              "--workdir", str(workdir), "--no-install", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    assert result["sent"] == [] and result["check"]["ok"] and result["workdir"] == str(workdir)


def test_device_bench_with_a_draft(deployed, sshd, tiny_pte):
    """The draft is deployed beside the target and the row decodes speculatively on the device;
    so does prompt lookup, with no second bundle."""
    from edgelm.bench import DEFAULT_PROMPT
    from edgelm.deploy.remote_bench import bench_on_device
    from edgelm.runtime import Engine

    _, workdir, _ = deployed
    result = bench_on_device(tiny_pte, "dev", workdir=str(workdir), ssh_config=sshd.config, python=sys.executable,
                             install=False, new_tokens=8, runs=1, warmup=0, threads=1, draft=tiny_pte, draft_tokens=3)
    assert result["name"] == "edgelm pte fp32 + draft pte fp32 (speculative, 3 tokens)"
    assert result["acceptance"]["median"] == 1.0  # the target as its own draft: verify agrees with decode
    host = Engine.load(tiny_pte, threads=1)
    ids = host.encode_prompt(DEFAULT_PROMPT, chat=bool(host.manifest.chat_template))
    assert result["greedy_tokens"] == list(host.generate_ids(ids, max_new_tokens=8, ignore_eos=True))
    result = bench_on_device(tiny_pte, "dev", workdir=str(workdir), ssh_config=sshd.config, python=sys.executable,
                             install=False, new_tokens=24, runs=1, warmup=0, threads=1, lookup=3)
    assert result["name"] == "edgelm pte fp32 + prompt lookup (speculative, up to 5 tokens)"
    assert result["greedy_tokens"] == list(host.generate_ids(ids, max_new_tokens=24, ignore_eos=True))


def test_device_bench_samples_when_asked(deployed, sshd, tiny_pte):
    """With sampling settings the device samples as the host would with the same seed."""
    from edgelm.bench import DEFAULT_PROMPT
    from edgelm.deploy.remote_bench import bench_on_device
    from edgelm.runtime import Engine
    from edgelm.sampling import SamplingConfig

    _, workdir, _ = deployed
    sampling = {"temperature": 1.0, "top_k": 20, "top_p": 1.0, "seed": 5}
    result = bench_on_device(tiny_pte, "dev", workdir=str(workdir), ssh_config=sshd.config, python=sys.executable,
                             install=False, new_tokens=8, runs=1, warmup=0, threads=1, sampling=sampling)
    assert result["name"] == "edgelm pte fp32, sampled (temperature 1, top-k 20)"
    assert "greedy_tokens" not in result
    host = Engine.load(tiny_pte, threads=1)
    ids = host.encode_prompt(DEFAULT_PROMPT, chat=bool(host.manifest.chat_template))
    assert result["tokens"] == list(host.generate_ids(ids, max_new_tokens=8, ignore_eos=True,
                                                      sampling=SamplingConfig(**sampling)))
