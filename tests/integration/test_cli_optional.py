"""Optional sub-CLIs: absent → left out; broken → registered as a command that reports the error."""

import sys

from typer.testing import CliRunner

from osdsim import cli


def test_broken_sub_cli_reports_instead_of_vanishing(tmp_path, monkeypatch):
    (tmp_path / "osdsim_broken_sub.py").write_text("raise RuntimeError('bug in the sub-CLI')\n")
    (tmp_path / "osdsim_needs_missing.py").write_text("import osdsim_no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cli._register_optional((
        ("osdsim_broken_sub", "zz-broken", "A broken command."),
        ("osdsim_needs_missing", "zz-missing-dep", "Imports a missing dependency."),
        ("osdsim_not_installed_xyz", "zz-absent", "Not installed."),
    ))
    names = {c.name for c in cli.app.registered_commands}
    assert "zz-absent" not in names  # that side is not installed: left out
    res = CliRunner().invoke(cli.app, ["zz-broken"])
    assert res.exit_code == 2
    assert "RuntimeError" in res.output and "bug in the sub-CLI" in res.output
    # A module that exists but imports something missing is a bug too, not an absent side.
    res = CliRunner().invoke(cli.app, ["zz-missing-dep"])
    assert res.exit_code == 2 and "osdsim_no_such_dependency_xyz" in res.output
    cli.app.registered_commands[:] = [c for c in cli.app.registered_commands if not (c.name or "").startswith("zz-")]
    for mod in ("osdsim_broken_sub", "osdsim_needs_missing"):
        sys.modules.pop(mod, None)
