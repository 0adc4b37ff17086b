"""The in-memory ``fake`` driver: replicas simulated in this process (see :mod:`.driver`).

It is added the way any driver is: this package plus one registry entry
(``docs/drivers.md`` walks through it), and it passes the same conformance
suite as the real drivers. Control-plane tests use it through the
reconciler's driver seam; nothing in the product picks it by itself.
"""

from uniframe.runtime.fake.driver import Behavior, BehaviorSource, FakeDriver

__all__ = ["Behavior", "BehaviorSource", "FakeDriver"]
