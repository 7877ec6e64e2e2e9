"""Readable views of hardware profiles (`osdsim profile show|diff`)."""

from __future__ import annotations

from rich.table import Table

from osdsim.cost.profile import HardwareProfile


def _flatten(profile: HardwareProfile) -> dict[str, str]:
    data = profile.model_dump(mode="json", exclude_none=True)
    out: dict[str, str] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = f"{node:.4g}" if isinstance(node, float) else str(node)

    walk("", data)
    return out


def profile_table(profile: HardwareProfile) -> Table:
    t = Table(title=f"profile {profile.name} ({profile.provenance.source})", title_justify="left")
    t.add_column("field")
    t.add_column("value", overflow="fold")
    for k, v in _flatten(profile).items():
        t.add_row(k, v)
    return t


def diff_table(a: HardwareProfile, b: HardwareProfile) -> Table:
    fa, fb = _flatten(a), _flatten(b)
    t = Table(title=f"{a.name} vs {b.name}", title_justify="left")
    t.add_column("field")
    t.add_column(a.name, overflow="fold")
    t.add_column(b.name, overflow="fold")
    for k in sorted(set(fa) | set(fb)):
        if fa.get(k) != fb.get(k):
            t.add_row(k, fa.get(k, "—"), fb.get(k, "—"))
    return t
