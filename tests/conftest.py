import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    parser.addoption(
        "--update-golden", action="store_true", help="rewrite tests/golden/ from the current compiler output"
    )


@pytest.fixture
def update_golden(request) -> bool:
    return request.config.getoption("--update-golden")


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    """Model references such as models/gpt.py:gpt_mini are relative to the repository root."""
    monkeypatch.chdir(REPO)
    yield
    os.chdir(REPO)
