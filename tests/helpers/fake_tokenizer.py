"""The tests' small tokenizer: ``varkit.testing.ToyTokenizer``, under the tests' old names."""

from __future__ import annotations

from varkit.testing import ToyConfig as FakeConfig
from varkit.testing import ToyTokenizer as FakeTokenizer

__all__ = ["FakeConfig", "FakeTokenizer"]
