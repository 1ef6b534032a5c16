"""`promptseg app` on the command line: its options, a busy port, another interface, a missing extra."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys

import pytest
from app_helpers import app_command, app_env

from promptseg.cli import main
from promptseg_app._commands import DEFAULT_HOST, DEFAULT_PORT, INSTALL_HINT, exposure_warning, is_loopback


@pytest.mark.parametrize("port", ["0", "70000", "-1", "http"])
def test_a_bad_port_is_refused_before_anything_starts(port, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["app", "--port", port])
    assert exit_info.value.code == 2
    assert "must be a port number from 1 to 65535" in capsys.readouterr().err


def without_gradio(monkeypatch) -> None:
    """Make `import gradio` fail as it does where Gradio is not installed, and forget the page module."""
    import promptseg_app

    monkeypatch.setitem(sys.modules, "gradio", None)
    monkeypatch.delitem(sys.modules, "promptseg_app.page", raising=False)
    monkeypatch.delattr(promptseg_app, "page", raising=False)


def test_a_bad_pixel_budget_is_refused_before_the_page_is_built(capsys, monkeypatch):
    without_gradio(monkeypatch)  # the check comes first: Gradio is not even needed
    assert main(["app", "--max-pixels", "0"]) == 2
    err = capsys.readouterr().err
    assert "max_pixels must be a whole number of pixels above 0" in err and "Traceback" not in err


def test_without_gradio_the_error_names_the_extra(capsys, monkeypatch):
    without_gradio(monkeypatch)
    assert main(["app"]) == 2
    err = capsys.readouterr().err
    assert "The quick-try page needs Gradio" in err and INSTALL_HINT in err and "Traceback" not in err


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.20", False), ("myhost.example", False),
])
def test_only_loopback_addresses_are_quiet(host, loopback):
    assert is_loopback(host) is loopback
    assert (exposure_warning(host, 8000) is None) is loopback


def test_another_interface_is_served_with_a_clear_warning(monkeypatch, caplog, capsys, tiny_sam3_dir):
    import promptseg_app.page as page

    served = []
    monkeypatch.setattr(page, "serve", lambda app, host, port: served.append((app.settings, host, port)))
    with caplog.at_level(logging.WARNING, logger="promptseg_app"):
        assert main(["app", "--host", "0.0.0.0", "--port", "8123", "--model", str(tiny_sam3_dir)]) == 0
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "bound to 0.0.0.0, not to 127.0.0.1" in warning and "port 8123" in warning and "no login" in warning
    (settings, host, port), = served
    assert (host, port, settings.model) == ("0.0.0.0", 8123, str(tiny_sam3_dir))
    assert "http://0.0.0.0:8123" in capsys.readouterr().out


def test_the_default_is_loopback_with_no_warning(monkeypatch, caplog):
    import promptseg_app.page as page

    served = []
    monkeypatch.setattr(page, "serve", lambda app, host, port: served.append((host, port)))
    with caplog.at_level(logging.WARNING, logger="promptseg_app"):
        assert main(["app"]) == 0
    assert served == [(DEFAULT_HOST, DEFAULT_PORT)] == [("127.0.0.1", 7860)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_busy_port_is_a_clear_error(tiny_sam3_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(app_command("--port", str(port)), env=app_env(tiny_sam3_dir, tmp_path / "cache"),
                              capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr
    assert f"Cannot serve on 127.0.0.1:{port}" in done.stderr and "--port" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_command_line_lists_app_without_importing_gradio():
    code = ("import sys; from promptseg.cli import build_parser; text = build_parser().format_help(); "
            "print('app' in text.split(), 'gradio' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["True", "False"], done.stderr
