"""One of several processes incrementing a counter kept in an object's spec.

Usage: ``counter_worker.py TARGET COUNT``. Each increment reads the object in
one transaction and writes it back in another with the generation it read,
like an API client doing GET then PUT; a stale write is refused and retried.
Prints ``{"done": COUNT, "conflicts": N}`` as JSON.
"""

from __future__ import annotations

import json
import sys

from uniframe.control.store import Store
from uniframe.errors import ConflictError


def main() -> None:
    target, count = sys.argv[1], int(sys.argv[2])
    store = Store.open(target)
    done = conflicts = 0
    while done < count:
        with store.tx(readonly=True) as tx:
            obj = tx.get_object("Workload", "counter")
        assert obj is not None
        try:
            with store.tx() as tx:
                tx.update_object("Workload", "counter", {"count": obj.spec["count"] + 1},
                                 generation=obj.generation)
            done += 1
        except ConflictError:
            conflicts += 1
    store.close()
    print(json.dumps({"done": done, "conflicts": conflicts}))


if __name__ == "__main__":
    main()
