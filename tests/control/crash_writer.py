"""Writes transactions in a loop until killed; run by the crash test, never by pytest itself.

Usage: ``crash_writer.py TARGET [HOLD_AT]``. Each transaction writes an
object, a replica of it and an event, and prints ``committed N`` once it has
committed. With HOLD_AT, transaction HOLD_AT prints ``inside N`` after its
writes and then sleeps before committing, so the test can kill it in the middle.
"""

from __future__ import annotations

import itertools
import sys
import time

from uniframe.control.store import Store


def main() -> None:
    target = sys.argv[1]
    hold_at = int(sys.argv[2]) if len(sys.argv) > 2 else -1
    store = Store.open(target)
    for i in itertools.count():
        with store.tx() as tx:
            tx.create_object("Workload", f"w{i}", {"i": i, "pad": "x" * 512})
            tx.add_replica(f"r{i}", "Workload", f"w{i}", driver="process",
                           image_digest=f"sha256:{i:064x}")
            tx.add_event("Workload", f"w{i}", "Step", f"step {i}", replica_id=f"r{i}")
            if i == hold_at:
                print(f"inside {i}", flush=True)
                time.sleep(120)
        print(f"committed {i}", flush=True)


if __name__ == "__main__":
    main()
