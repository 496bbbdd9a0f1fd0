"""Device tests: deploy a small bundle to a real (or emulated) device and check it there.

    python -m pytest device_tests --device ssh://pi@raspberrypi.local
    python -m pytest device_tests --device edgelm-board --ssh-config /var/tmp/edgelm-board/ssh_config
    python -m pytest device_tests --device adb://SERIAL

Without --device (or EDGELM_DEVICE) every test is skipped with the reason. Over adb, the tests
skip when no such device is attached (the reason is adb's own message). Results (deploy
timings, latency, the device's facts) go to --results as JSON; a run on the emulated board is
labelled "emulated": true and its file name starts with "emulated-".
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import time
from pathlib import Path

import pytest

from edgelm.config import PTE_ATTENTIONS

HERE = Path(__file__).resolve().parent
FORMATS = ("onnx", "tflite", "pte")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """No pytest-xdist workers here (pyproject.toml's ``-n auto`` is for tests/): the device tests share one
    device, one working folder on it and one report."""
    return 0


def pytest_addoption(parser):
    g = parser.getgroup("edgelm device tests")
    g.addoption("--device", default=os.environ.get("EDGELM_DEVICE"),
                help="device URL: ssh://[user@]host[:port], an ssh Host alias, adb://SERIAL or local "
                     "[env EDGELM_DEVICE]; without it the device tests skip")
    g.addoption("--ssh-config", default=os.environ.get("EDGELM_SSH_CONFIG"),
                help="ssh config file passed to ssh -F [env EDGELM_SSH_CONFIG]")
    g.addoption("--workdir", default=os.environ.get("EDGELM_DEVICE_WORKDIR"),
                help="working folder on the device (default: ~/edgelm-device-tests; /data/local/tmp/... over adb)")
    g.addoption("--device-python", default=None, help="Python on the device (default: python3)")
    g.addoption("--device-format", default=os.environ.get("EDGELM_DEVICE_FORMAT", "onnx"), choices=FORMATS,
                help="format of the tiny bundle converted for the device (default: onnx)")
    g.addoption("--device-bundle", default=None, help="use this bundle instead of converting builtin:tiny")
    g.addoption("--pte-attention", default=os.environ.get("EDGELM_DEVICE_PTE_ATTENTION", "custom"),
                choices=PTE_ATTENTIONS,
                help="pte: the tiny bundle's attention (portable for an ARMv8.0 core such as a Raspberry Pi 4)")
    g.addoption("--no-install", action="store_true", help="do not install anything on the device")
    g.addoption("--bench-runs", type=int, default=5, help="timed runs in the latency test (default 5)")
    g.addoption("--bench-tokens", type=int, default=32, help="tokens per timed run (default 32)")
    g.addoption("--connect-timeout", type=int, default=20, help="ssh ConnectTimeout in seconds (default 20)")
    g.addoption("--results", default=str(HERE / "results"), help="folder for the JSON report")


class Report:
    """What the session learned; written as JSON at the end."""

    def __init__(self, config) -> None:
        self.config = config
        self.data: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device_url": None, "emulated": None,
                           "host": {"machine": platform.machine(), "python": platform.python_version()},
                           "deploy": {}, "bench": None, "checks": {}}
        self.t0 = time.perf_counter()

    def write(self) -> Path | None:
        if not self.data["device_url"]:
            return None
        self.data["session_s"] = time.perf_counter() - self.t0
        folder = Path(self.config.getoption("--results"))
        folder.mkdir(parents=True, exist_ok=True)
        host = re.sub(r"[^A-Za-z0-9.-]+", "_", self.data["device_url"].split("://")[-1]) or "device"
        label = "emulated-" if self.data["emulated"] else ""
        path = folder / f"{label}{host}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        text = json.dumps(self.data, indent=2) + "\n"
        path.write_text(text)
        (folder / f"{label}latest.json").write_text(text)
        return path


@pytest.fixture(scope="session")
def report(request):
    r = Report(request.config)
    yield r
    path = r.write()
    if path is not None:
        print(f"\ndevice report: {path}")


@pytest.fixture(scope="session")
def device_url(request) -> str:
    url = request.config.getoption("--device")
    if not url:
        pytest.skip("no device given: run `python -m pytest device_tests --device ssh://user@host` "
                    "(or --device adb://SERIAL; see device_tests/README.md)")
    return url


@pytest.fixture(scope="session")
def transport(request, device_url, report):
    from edgelm.deploy.transports import AdbTransport, DeviceUnreachableError, open_transport

    t = open_transport(device_url, ssh_config=request.config.getoption("--ssh-config"),
                       connect_timeout=request.config.getoption("--connect-timeout"))
    if isinstance(t, AdbTransport):
        if shutil.which(t.adb) is None:
            pytest.skip("the adb client is not installed (apt-get install adb, or Android platform-tools)")
        try:
            state = t.state()
        except DeviceUnreachableError as e:
            pytest.skip(f"no adb device attached: {e}")
        if state != "device":
            pytest.skip(f"adb device {device_url} is {state!r}, not ready")
    report.data["device_url"] = str(t)
    return t


@pytest.fixture(scope="session")
def workdir(request, transport) -> str:
    w = request.config.getoption("--workdir")
    if w:
        return w
    return "/data/local/tmp/edgelm-device-tests" if transport.url.scheme == "adb" else "~/edgelm-device-tests"


@pytest.fixture(scope="session")
def host_bundle(request, device_url, tmp_path_factory, report) -> Path:
    given = request.config.getoption("--device-bundle")
    if given:
        return Path(given)
    fmt = request.config.getoption("--device-format")
    t = time.perf_counter()
    path = convert_tiny(tmp_path_factory.mktemp("device-bundle") / f"tiny-{fmt}", fmt,
                        pte_attention=request.config.getoption("--pte-attention"))
    report.data["convert_s"] = time.perf_counter() - t
    return path


@pytest.fixture(scope="session")
def tiny_converter():
    """:func:`convert_tiny`, for tests that convert a bundle of their own."""
    return convert_tiny


def convert_tiny(out: Path, fmt: str, **options) -> Path:
    """The tiny built-in model converted to ``fmt`` at ``out`` (skips without the conversion extra)."""
    try:
        from edgelm.converters.pipeline import ConvertOptions, convert
    except ImportError as e:
        pytest.skip(f"converting the tiny bundle needs the conversion extra ({e}); or pass --device-bundle")
    [(path, _)] = convert(ConvertOptions(source="builtin:tiny", out=out, format=fmt, progress=False, max_prefill=16,
                                         **options))
    return path


@pytest.fixture(scope="session")
def deploy_kwargs(request, transport, workdir) -> dict:
    return {"transport": transport, "workdir": workdir, "python": request.config.getoption("--device-python"),
            "install": not request.config.getoption("--no-install")}


def _deploy(bundle, kw, **extra):
    from edgelm.deploy import deploy

    args = {**kw, **extra}
    t = args.pop("transport")
    return deploy(bundle, str(t), args.pop("workdir"), args.pop("install"), transport=t, **args)


@pytest.fixture(scope="session")
def do_deploy():
    """deploy(bundle, deploy_kwargs, **overrides) with the session's transport and options."""
    return _deploy


@pytest.fixture(scope="session")
def deployed(host_bundle, deploy_kwargs, report):
    """The tiny bundle deployed (and the device prepared: venv, runtime) once per session."""
    r = _deploy(host_bundle, deploy_kwargs, progress=print)
    report.data["emulated"] = r.emulated
    report.data["deploy"]["first"] = {"sent": r.sent, "skipped": r.skipped, "installed": r.installed,
                                      "bytes_sent": r.bytes_sent, "timings": r.timings, "machine": r.machine,
                                      "workdir": r.workdir, "bundle": r.bundle}
    return r
