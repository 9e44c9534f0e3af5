"""Integration-test stack for popvault: Dovecot POP3, Redis and Elasticsearch on loopback.

Run ``python -m tests.harness up`` (or just ``scripts/test``); pytest fixtures in
``tests/integration/conftest.py`` call the same idempotent start functions.
"""
