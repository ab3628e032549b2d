"""Every test runs in a directory of its own: a ``dbnode train`` without
``--out`` writes its run under ``runs/`` of the working directory, which
must never be the checkout."""

import pytest


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
