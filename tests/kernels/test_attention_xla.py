"""The plain-JAX reference implementation through the public API."""

from attention_test_base import AttentionTestBase


class TestXla(AttentionTestBase):
    IMPLEMENTATION = "xla"
