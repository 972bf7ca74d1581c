"""Unit tests: one module or function of unite_core at a time, in process, no Ray or MLflow."""

import pytest

from tests.conftest import TINY, deep_merge
from unite_core.config import config_from_dict


@pytest.fixture
def tiny_cfg():
    """tiny_cfg(**sections): the tiny digits config (tests/conftest.py TINY) with `sections` merged in."""
    def make(**sections):
        return config_from_dict(deep_merge(TINY, sections))
    return make
