"""Test support code that is not a test: harnesses and helpers the test modules import."""
