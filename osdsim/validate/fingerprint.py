"""Which device a profile or a recorded run was made on, and whether that is this device.

A pass-cost profile or a recorded real run says nothing about a machine other than the one it was
made on (issue 12 item 5b): a newer CPU generation, another GPU or another torch thread count moves
every pass time. `device_fingerprint()` describes this device in a small dict (pure python for a CPU;
torch only to name a GPU); the real side stamps it into summary.json as `device_fingerprint`, and
validate compares it with the device it runs on.
"""

from __future__ import annotations

import platform
import re
import sys
from pathlib import Path

KEYS_CPU = ("kind", "cpu_model", "cpu_family", "cpu_model_id", "threads")
KEYS_GPU = ("kind", "gpu")


def _cpuinfo() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if out:  # first processor block only
                break
            continue
        out.setdefault(key.strip(), value.strip())
    return out


def device_fingerprint(device: str = "cpu", threads: int | None = None) -> dict:
    """{kind, cpu_model, cpu_family, cpu_model_id, threads, gpu} of this machine for `device`
    (cpu | cuda | cuda:N). threads: torch threads the run uses (default: torch's, if loaded, else 1)."""
    info = _cpuinfo()
    model = info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if threads is None:
        torch = sys.modules.get("torch")
        threads = int(torch.get_num_threads()) if torch is not None else 1
    fp = {"kind": "cuda" if str(device).startswith("cuda") else "cpu", "cpu_model": model,
          "cpu_family": info.get("cpu family", ""), "cpu_model_id": info.get("model", ""),
          "threads": int(threads), "gpu": None}
    if fp["kind"] == "cuda":
        try:
            import torch

            index = int(str(device).split(":", 1)[1]) if ":" in str(device) else 0
            fp["gpu"] = str(torch.cuda.get_device_name(index))
        except Exception:  # noqa: BLE001 - no CUDA here: the name stays unknown
            fp["gpu"] = None
    return fp


def describe(fp: dict | None) -> str:
    if not fp:
        return "an unknown device"
    if fp.get("kind") == "cuda":
        return f"GPU {fp.get('gpu') or 'unknown'}"
    fam = f", family {fp['cpu_family']} model {fp['cpu_model_id']}" if fp.get("cpu_family") else ""
    return f"CPU {fp.get('cpu_model')}{fam}, {fp.get('threads')} torch thread(s)"


def differences(recorded: dict | None, here: dict) -> list[str]:
    """What differs between a recorded fingerprint and this device's (empty: the same device).
    A missing fingerprint is an unknown device: it differs."""
    if not isinstance(recorded, dict):
        return ["no device fingerprint recorded"]
    keys = KEYS_GPU if here.get("kind") == "cuda" or recorded.get("kind") == "cuda" else KEYS_CPU
    return [f"{k} {recorded.get(k)!r} here {here.get(k)!r}" for k in keys if str(recorded.get(k)) != str(here.get(k))]


_DESC = re.compile(r"^(?P<kind>CPU|GPU)\s+(?P<model>.*?)\s*\((?P<rest>.*)\)\s*$")


def profile_fingerprint(profile) -> dict | None:
    """The fingerprint of the device a *measured* profile was calibrated on (parsed from its
    `provenance.measured_on` / `device`, as osdsim calibrate writes them); None for datasheet profiles."""
    prov = getattr(profile, "provenance", None)
    if prov is None or getattr(prov, "source", None) != "measured":
        return None
    text = getattr(prov, "measured_on", None) or getattr(profile, "device", "") or ""
    m = _DESC.match(text.strip())
    if not m:
        return {"kind": "unknown", "cpu_model": text}
    rest = m.group("rest")
    if m.group("kind") == "GPU":
        return {"kind": "cuda", "gpu": m.group("model")}
    threads = re.search(r"(\d+) torch threads?", rest)
    fam = re.search(r"family (\S+) model (\S+?)(?:,|$)", rest)
    return {"kind": "cpu", "cpu_model": m.group("model"),
            "cpu_family": fam.group(1) if fam else "", "cpu_model_id": fam.group(2) if fam else "",
            "threads": int(threads.group(1)) if threads else None, "gpu": None}


def profile_differences(profile, here: dict) -> list[str]:
    """Differences between a measured profile's device and this one ([] for datasheet profiles).

    A profile's CPU model name is compared after calibrate's own normalisation of `describe()`;
    family/model ids and the thread count are compared when the profile records them."""
    fp = profile_fingerprint(profile)
    if fp is None:
        return []
    if fp.get("kind") == "unknown":
        return [f"unrecognised device {fp.get('cpu_model')!r}"]
    if fp["kind"] != here.get("kind"):
        return [f"kind {fp['kind']!r} here {here.get('kind')!r}"]
    if fp["kind"] == "cuda":
        return [] if _norm(fp["gpu"]) == _norm(here.get("gpu")) else [f"gpu {fp['gpu']!r} here {here.get('gpu')!r}"]
    diffs = []
    if _norm(fp["cpu_model"]) != _norm(here.get("cpu_model")):
        diffs.append(f"cpu_model {fp['cpu_model']!r} here {here.get('cpu_model')!r}")
    for k in ("cpu_family", "cpu_model_id", "threads"):
        if fp.get(k) not in (None, "") and str(fp[k]) != str(here.get(k)):
            diffs.append(f"{k} {fp[k]!r} here {here.get(k)!r}")
    return diffs


def _norm(name: object) -> str:
    return re.sub(r"\s+", " ", str(name or "")).strip().lower()
