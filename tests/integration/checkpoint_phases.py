"""Two phases of the checkpoint test, each in its own process with its own Ray.

save DIR   put 100 rows, ack 30, hold 10 leased, checkpoint the store to DIR/store
load DIR   start a fresh store, restore DIR/store, stream every remaining row
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import ray

from asyncflow.config import DataPlaneConfig
from dataplane import start_store


def main(phase: str, out: Path) -> None:
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    store = start_store(DataPlaneConfig(name="ckpt", num_storage_units=2))
    client = store.client()
    if phase == "save":
        client.create_partition("p", {"uid": "int64"}, consumers=["trainer"])
        for start in range(0, 100, 20):
            client.put("p", {"uid": np.arange(start, start + 20)})
        done = client.get("p", ["uid"], 30, "trainer")
        client.ack(done)
        held = client.get("p", ["uid"], 10, "trainer", lease_s=3600)  # in flight when the run stops
        client.checkpoint(str(out / "store"))
        (out / "acked.txt").write_text(" ".join(map(str, done["uid"].tolist())))
        (out / "leased.txt").write_text(" ".join(map(str, held["uid"].tolist())))
    else:
        client.restore(str(out / "store"))
        client.seal("p")
        seen = [u for batch in client.stream("p", ["uid"], 16, "trainer") for u in batch["uid"].tolist()]
        (out / "after.txt").write_text(" ".join(map(str, seen)))
    client.close()
    store.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
