"""Every test under ``tests/s3`` runs with the test AWS variables set (``aws_test_env``).

The server fixtures themselves (``s3_server``, ``s3_config``, ``s3_bucket``,
``s3_prefix``) live in ``tests/conftest.py`` so tests elsewhere can use them too.
"""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _aws_env(aws_test_env: None) -> None:
    """The AWS variables of ``aws_test_env`` for each test here."""
