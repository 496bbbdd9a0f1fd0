"""Deploy bundles to devices and measure them there (torch-free, stdlib + system tools).

- :mod:`edgelm.deploy.transports`: ``local``, ``ssh://user@host[:port]`` (or an ssh Host alias)
  through the system OpenSSH client, ``adb://SERIAL`` through the ``adb`` binary;
- :mod:`edgelm.deploy.deploy`: :func:`deploy` copies a bundle (skipping files whose sha256
  already matches), prepares a venv on the device and verifies the bundle there;
- :mod:`edgelm.deploy.remote_bench`: :func:`bench_on_device`, TTFT/prefill/decode medians and
  p90 with the device's reproducibility facts, as JSON;
- :mod:`edgelm.deploy.ondevice`: what runs on the device (``python -m edgelm.deploy.ondevice``).
"""

from edgelm.deploy.deploy import DeployError, DeployResult, deploy, verify_on_device
from edgelm.deploy.remote_bench import bench_on_device
from edgelm.deploy.transports import (
    DeviceError,
    DeviceUnreachableError,
    DeviceURL,
    DeviceURLError,
    open_transport,
    parse_device_url,
)

__all__ = [
    "DeployError", "DeployResult", "DeviceError", "DeviceURL", "DeviceURLError", "DeviceUnreachableError",
    "bench_on_device", "deploy", "open_transport", "parse_device_url", "verify_on_device",
]
