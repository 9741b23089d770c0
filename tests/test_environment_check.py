"""test_setup.py (the environment check run by `./run.sh test`): its table, exit codes and failure rows."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

import test_setup as T


def _run(args, env, timeout=240):
    return subprocess.run([sys.executable, str(REPO / "test_setup.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_check_passes_on_this_machine_with_synthetic_data(cli_env, synthetic_root):
    out = _run(["--data-root", str(synthetic_root), "--profile", "cpu"], cli_env)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("python", "packages", "cuda", "distributed backend", "hardware profile", "data root",
                 "annotations", "models", "losses", "disk for runs", "loader throughput"):
        assert f"  {name} " in out.stdout, f"row {name!r} missing:\n{out.stdout}"
    assert "0 fail" in out.stdout.splitlines()[-1]
    assert "samples/s" in out.stdout and "Traceback" not in out.stdout + out.stderr


def test_bad_data_root_is_a_failure_with_its_fix(cli_env, tmp_path):
    out = _run(["--data-root", str(tmp_path / "nowhere"), "--profile", "cpu"], cli_env)
    assert out.returncode == 1
    row = next(line for line in out.stdout.splitlines() if "data root" in line)
    assert row.strip().startswith("FAIL") and "nowhere" in row
    assert "fix: set --data-root" in out.stdout and "Traceback" not in out.stdout + out.stderr


def test_package_outside_requirements_fails(monkeypatch):
    real_version = T.md.version
    monkeypatch.setattr(T.md, "version", lambda name: "1.0.0" if name == "numpy" else real_version(name))
    status, detail = T.check_packages()
    assert status == T.FAIL and "numpy 1.0.0" in detail


def test_missing_package_fails(monkeypatch):
    real_version = T.md.version

    def version(name):
        if name == "tqdm":
            raise T.md.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(T.md, "version", version)
    status, detail = T.check_packages()
    assert status == T.FAIL and "tqdm missing" in detail


@pytest.mark.parametrize("free_gib, status", [(0.5, T.FAIL), (5, T.WARN), (100, T.PASS)])
def test_disk_thresholds(monkeypatch, tmp_path, free_gib, status):
    monkeypatch.setattr(T.shutil, "disk_usage", lambda p: type("U", (), {"free": free_gib * 2**30})())
    assert T.check_disk(tmp_path)[0] == status


def test_unannotated_classes_warn(entries):
    import dataclasses

    first_train = next(e for e in entries if e.split == "train")
    only = [dataclasses.replace(first_train, classes=("nuc",))]
    status, detail = T.check_annotation(only, ("nuc", "pm"))
    assert status == T.WARN and "pm" in detail and "validate: nuc, pm" in detail
