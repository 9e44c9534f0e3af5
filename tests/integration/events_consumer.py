"""A ticket system's Celery worker, as small as it gets, for tests/integration/test_events.py.

``celery -A tests.integration.events_consumer worker -Q <queue>`` with
``POPVAULT_EVENTS_BROKER`` set. Every delivery is appended to ``test:events:received`` before
deduplication (so tests can count at-least-once redeliveries); events handled after
deduplication go to ``test:events:handled``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import redis
from celery import Celery, signals

from ingest.events import TICKET_EVENT_TASK
from workers.events import register_ticket_consumer

RECEIVED = "test:events:received"
HANDLED = "test:events:handled"

BROKER = os.environ["POPVAULT_EVENTS_BROKER"]
app = Celery("ticket-consumer", broker=BROKER)
app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                worker_prefetch_multiplier=1, task_acks_late=True)
_client: redis.Redis | None = None


def client() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(BROKER)
    return _client


def handle(event: Mapping[str, Any]) -> None:
    client().rpush(HANDLED, json.dumps(event))


ticket_event = register_ticket_consumer(app, handle, client)


@signals.task_prerun.connect
def _received(task: Any = None, args: Any = None, **_: Any) -> None:
    if task is not None and task.name == TICKET_EVENT_TASK and args:
        client().rpush(RECEIVED, json.dumps(args[0]))
