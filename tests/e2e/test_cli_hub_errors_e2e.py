"""An operator's command shows the hub's refusal as the hub wrote it. The hub's details
echo what users typed (spoke ids, names, access request ids); rich read them as markup and
emoji codes, so a detail could hide text, fake emphasis or plant a hyperlink in what the
operator reads."""

from __future__ import annotations

import os
import subprocess
import sys

from tributary.testbed.federation import LocalFederation

HOSTILE = "site-[red]x[/] [conceal]secret[/conceal] [link=https://evil.example]y[/link] :smile:"


def test_a_refusal_echoing_typed_text_is_shown_literally(federation: LocalFederation) -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "tributary.cli", "counts", "ask", "--spoke", HOSTILE,
         "--wait", "0"],
        capture_output=True, text=True, timeout=60, env={
            **os.environ, "TRIBUTARY_HUB_URL": federation.hub_url,
            "TRIBUTARY_TOKEN": federation.admin_token, "COLUMNS": "300"})
    assert shown.returncode == 1, (shown.stdout, shown.stderr)
    assert f"count refused (422): unknown spokes: {HOSTILE}" in shown.stderr, shown.stderr
    assert "😄" not in shown.stderr
