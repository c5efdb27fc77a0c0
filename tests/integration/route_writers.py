"""A process that changes one model's route many times, for the concurrent-writers tests.

    python -m tests.integration.route_writers URL MODEL WRITER COUNT START_FILE

Waits for START_FILE to exist (so that every writer starts at once), then makes COUNT
changes, each adding a replica named after this writer and change to the route's one
backend, and prints the generations it was given as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from turnout.domain import Backend, Replica, Route
from turnout.store import Store


def add_replica(name: str):  # type: ignore[no-untyped-def]
    def change(current: Route | None) -> list[Backend]:
        replicas = list(current.backends[0].replicas) if current and current.backends else []
        replicas.append(Replica(url=f"http://{name}"))
        return [Backend(version="v1", weight=100, url=replicas[0].url,
                        served_model_name="m", replicas=replicas)]
    return change


async def main(url: str, model_id: str, writer: str, count: int, start: Path) -> None:
    store = Store.from_url(url)
    try:
        await store.ping()  # connected before the start, so the writes overlap
        deadline = time.monotonic() + 60
        while not start.exists() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        generations = []
        for i in range(count):
            route = await store.update_route(model_id, add_replica(f"{writer}-{i}"),
                                             change_key=f"{writer}/{i}")
            generations.append(route.generation)
        print(json.dumps(generations))
    finally:
        await store.close()


if __name__ == "__main__":
    url, model_id, writer, count, start = sys.argv[1:6]
    asyncio.run(main(url, model_id, writer, int(count), Path(start)))
