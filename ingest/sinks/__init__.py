"""Sinks take documents and receipts in batches and report an outcome per message."""
