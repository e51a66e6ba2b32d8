"""kdinpaint sets OpenMP's spin count before torch loads (a shared machine), and leaves a user's setting alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = "import os, {first}; import kdinpaint, torch; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"


def _env_after(first: str, **env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", CODE.format(first=first)], env={**base, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    return out


@pytest.mark.parametrize("first, env, expected", [
    ("sys", {}, ["10000", "None"]),  # kdinpaint first: set before torch loads
    ("torch", {}, ["None", "None"]),  # torch already loaded: OpenMP read its settings, nothing changed
    ("sys", {"OMP_WAIT_POLICY": "active"}, ["None", "active"]),  # the user's choice stays
    ("sys", {"GOMP_SPINCOUNT": "5"}, ["5", "None"]),
])
def test_the_openmp_spin_count_is_set_only_before_torch_and_never_over_the_user(first, env, expected):
    assert _env_after(first, **env) == expected
