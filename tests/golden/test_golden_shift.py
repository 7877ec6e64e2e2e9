"""Golden summary of scenarios/shift.yaml.

Regenerate ONLY on purpose (a physics or reporting change), and say why in the commit message:
    python -m tests.golden.test_golden_shift
"""

import json
from pathlib import Path

from osdsim.api import compare
from osdsim.report.writers import comparison_document, summary_json
from osdsim.scenario import load_scenario

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("shift_summary.json")


def current() -> str:
    # calibration/a100-80g.yaml is fitted on Vidur's CUDA timings since issue 13; the golden is a
    # regression of the simulator's logic and keeps pricing with the datasheet profile it was made on.
    sc = load_scenario(REPO / "scenarios" / "shift.yaml", ["hardware.profile=a100-80g-datasheet"])
    return summary_json(comparison_document(compare(sc)))


def test_shift_summary_matches_golden():
    expected = json.loads(GOLDEN.read_text())
    got = json.loads(current())
    assert got == expected, "scenarios/shift.yaml summary changed; regenerate only on purpose"


if __name__ == "__main__":
    GOLDEN.write_text(current())
    print(f"wrote {GOLDEN}")
