"""`promptseg fiftyone install`, and the rule that the CLI hook never imports fiftyone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from promptseg.cli import main
from promptseg_fiftyone._commands import PLUGIN_DIR


def test_importing_the_command_hook_does_not_import_fiftyone():
    code = "import sys, promptseg_fiftyone._commands; sys.exit('fiftyone' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_install_links_the_plugin_into_the_plugins_dir(tmp_path, capsys):
    assert main(["fiftyone", "install", "--dir", str(tmp_path)]) == 0
    link = tmp_path / "promptseg-fiftyone"
    assert link.is_symlink() and link.resolve() == PLUGIN_DIR
    assert (link / "fiftyone.yml").read_text().startswith('name: "@promptseg/fiftyone"')
    assert main(["fiftyone", "install", "--dir", str(tmp_path)]) == 0  # idempotent
    assert "Installed @promptseg/fiftyone" in capsys.readouterr().out


def test_install_copy_refuses_to_clobber_without_force(tmp_path, capsys):
    assert main(["fiftyone", "install", "--dir", str(tmp_path), "--copy"]) == 0
    copied = tmp_path / "promptseg-fiftyone"
    assert not copied.is_symlink() and (copied / "__init__.py").is_file() and (copied / "fiftyone.yml").is_file()
    assert not any(Path(copied).rglob("__pycache__"))
    assert main(["fiftyone", "install", "--dir", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["fiftyone", "install", "--dir", str(tmp_path), "--force"]) == 0
    assert copied.is_symlink()
