"""popvault's pure pipeline: POP3 source, message → document transform, archive and index sinks.

Nothing here imports Celery or a server client at module top, so the pipeline can run in
process (``popvault poll``), under Celery (``workers/``) or in tests without servers.
"""

__version__ = "0.1.0"
