"""The import-time check that the compiled extension was built against the torch that runs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_with_build_info(version: str | None) -> subprocess.CompletedProcess:
    """Imports fusedclr in a fresh process whose build record says ``version`` (None: no record)."""
    fake = "" if version is None else textwrap.dedent(f"""
        m = types.ModuleType("fusedclr._build_info")
        m.TORCH_VERSION = {version!r}
        sys.modules["fusedclr._build_info"] = m
    """)
    code = textwrap.dedent("""
        import sys, types, warnings
        {fake}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fusedclr
        for w in caught:
            if "built against torch" in str(w.message):
                print(w.category.__name__, w.message)
    """).format(fake=fake)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_import_warns_when_built_against_another_torch():
    proc = _import_with_build_info("1.0.0")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"RuntimeWarning fusedclr's compiled extension was built against torch 1.0.0, "
                               f"but torch {torch.__version__} is running")
    assert "pip install --no-build-isolation ." in lines[0]


def test_import_is_quiet_when_the_torch_matches():
    proc = _import_with_build_info(torch.__version__)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""


def test_setup_records_the_torch_it_builds_against(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("fusedclr_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # main() runs only as a script
    (tmp_path / "fusedclr").mkdir()
    monkeypatch.setattr(setup, "ROOT", str(tmp_path))
    setup._write_build_info()
    recorded: dict = {}
    exec((tmp_path / "fusedclr" / "_build_info.py").read_text(), recorded)
    assert recorded["TORCH_VERSION"] == torch.__version__
