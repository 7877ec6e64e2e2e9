"""Device checks of `osdsim calibrate` (issue 4, item 1): names, mismatches, profile names, and the
keep-the-previous-profile rule. Device facts are given as DeviceInfo, so no GPU or torch is needed."""

from __future__ import annotations

import pytest
import yaml

from osdsim.calibrate.devices import (
    GIB,
    KNOWN_NAMES,
    DeviceInfo,
    check_requested,
    profile_name,
    shipped_profile_for,
    slug,
)
from osdsim.errors import InputError

H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", 79.1 * GIB)
A100_40 = DeviceInfo("cuda", "NVIDIA A100-SXM4-40GB", 39.4 * GIB)
A100_80 = DeviceInfo("cuda", "NVIDIA A100-SXM4-80GB", 79.1 * GIB)
H200 = DeviceInfo("cuda", "NVIDIA H200", 139.8 * GIB)
CPU = DeviceInfo("cpu", "AMD EPYC 9B14", 24 * GIB, cores=2, threads=1)


def test_matching_gpu_names_give_the_profile_name():
    assert check_requested("h100", H100) == "h100"
    assert check_requested("H200", H200) == "h200"
    assert check_requested("a100", A100_80) == "a100"
    assert check_requested("a100-80g", A100_80) == "a100-80g"
    assert check_requested("a100-40g", A100_40) == "a100-40g"
    assert check_requested("cpu", CPU) == "cpu-amd-epyc-9b14"


def test_asked_a100_found_h100_names_what_was_found_and_the_shipped_profile():
    with pytest.raises(InputError) as exc:
        check_requested("a100", H100)
    msg = str(exc.value)
    assert "\n" not in msg and "H100" in msg and "calibration/h100.yaml" in msg


def test_a100_memory_variants_are_told_apart():
    with pytest.raises(InputError, match="calibration/a100-80g.yaml"):
        check_requested("a100-40g", A100_80)


def test_asked_gpu_without_cuda_says_so():
    with pytest.raises(InputError, match="no CUDA device") as exc:
        check_requested("h200", CPU)
    assert "--gpu cpu" in str(exc.value)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(InputError) as exc:
        check_requested("tpu-v5", CPU)
    for name in KNOWN_NAMES:
        assert name in str(exc.value)


def test_auto_profile_names():
    assert profile_name(H100) == "h100"
    assert profile_name(A100_40) == "a100-40g"
    assert profile_name(A100_80) == "a100-80g"
    assert profile_name(DeviceInfo("cuda", "NVIDIA GeForce RTX 4090", 24 * GIB)) == "geforce-rtx-4090"
    assert profile_name(DeviceInfo("cpu", "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", 1.0)) == (
        "cpu-intel-xeon-platinum-8375c"
    )
    assert slug("AMD EPYC") == "amd-epyc"


def test_shipped_profile_hint_prefers_the_specific_a100():
    assert shipped_profile_for(A100_80) == "calibration/a100-80g.yaml"
    assert shipped_profile_for(H200) == "calibration/h200.yaml"


def test_existing_profile_is_kept_as_prev_unless_forced(tmp_path):
    from osdsim.calibrate.fit import FitResult
    from osdsim.calibrate.run import Outcome, write_outputs
    from osdsim.cost.profile import load_profile, resolve_profile_path

    shipped = load_profile(resolve_profile_path("h200"))
    out = tmp_path / "dev.yaml"
    out.write_text("old profile\n")
    (tmp_path / "dev.csv").write_text("old csv\n")
    outcome = Outcome(shipped, [], FitResult({}, {}, {}), 1.0)
    path, csv_path, prev = write_outputs(outcome, out, force=False)
    assert prev == tmp_path / "dev.prev.yaml" and prev.read_text() == "old profile\n"
    assert (tmp_path / "dev.prev.csv").read_text() == "old csv\n"
    assert load_profile(path).name == "h200"
    assert yaml.safe_load(path.read_text())["provenance"]["raw_measurements"] == "dev.csv"
    prev.unlink()
    _, _, prev = write_outputs(outcome, out, force=True)
    assert prev is None and not (tmp_path / "dev.prev.yaml").exists()
