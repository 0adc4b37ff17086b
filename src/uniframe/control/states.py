"""The words the control plane writes in the store for replicas and rollouts.

They are part of the API (clients filter and colour by them), so they live in
one place and never change meaning.
"""

from __future__ import annotations

# Replica states, as the reconciler last observed them.
PENDING = "pending"        # recorded, not yet started
STARTING = "starting"      # the process runs, readiness not yet seen
READY = "ready"            # answered the readiness probe
UNHEALTHY = "unhealthy"    # was ready, now fails its probe; restarted after failureThreshold
CRASHED = "crashed"        # died; waiting for its back-off to restart
CRASH_LOOP = "crash-loop"  # died quickly again and again; still retried at the longest back-off

REPLICA_STATES = (PENDING, STARTING, READY, UNHEALTHY, CRASHED, CRASH_LOOP)

# Rollout states.
PROGRESSING = "progressing"  # new replicas are being started and old ones retired
PAUSED = "paused"            # a canary is ready and takes its share; waiting for promote or undo
PROMOTED = "promoted"        # a canary was promoted; finishing like a rolling update
COMPLETE = "complete"        # every replica runs the newest revision and is ready
ROLLED_BACK = "rolled-back"  # the new replicas failed; the previous revision was applied again
FAILED = "failed"            # the new replicas fail and there is nothing to roll back to

ROLLOUT_STATES = (PROGRESSING, PAUSED, PROMOTED, COMPLETE, ROLLED_BACK, FAILED)
