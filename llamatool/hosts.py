"""Many processes (hosts): start them, watch for a lost one, agree on when to stop."""

import os
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from llama_jax import InputError


# Every process runs the same command. jax.distributed connects them through
# process 0 (the coordinator), after which jax.devices() lists the devices of
# all of them and one mesh spans them. Flags name the coordinator; without
# them, a SLURM job step of several tasks is detected from its environment.
# Decisions a process takes alone (a signal arrived, the time budget ran out)
# are agreed on at every step (any_process), so that all processes stop at the
# same step: a collective that only some processes enter never returns.

# How long to wait for every process to join, and for a silent process before
# the others stop: JAX's coordination service then ends them, its message
# naming the lost process ("tasks are unhealthy (stopped sending heartbeats)").
COORDINATOR_TIMEOUT_S = 60


def wait_for_port(address, timeout):
    """True once a TCP connection to HOST:PORT succeeds, False after timeout."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)


def start_distributed(coordinator=None, num_processes=None, process_id=None,
                      timeout=COORDINATOR_TIMEOUT_S):
    """Joins this process to a run of several (before JAX starts its backend):
    process process_id of num_processes, process 0 listening at coordinator
    (HOST:PORT); all three None: under SLURM's srun, read from its
    environment, else a run of one. timeout: seconds to wait for every
    process to join, and for a silent one before the others stop.
    -> True when it joined a run of several."""
    given = {"--coordinator": coordinator, "--num-processes": num_processes,
             "--process-id": process_id}
    if all(v is None for v in given.values()):
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:  # srun: JAX reads SLURM_* itself
            jax.distributed.initialize(initialization_timeout=int(timeout),
                                       heartbeat_timeout_seconds=int(timeout))
            return True
        return False
    missing = [flag for flag, v in given.items() if v is None]
    if missing:
        raise InputError(f"{' and '.join(missing)} missing: a run on several processes needs "
                         "--coordinator HOST:PORT (process 0's address), --num-processes N and "
                         "--process-id I (0 to N-1), the same on every process except I")
    n, i = num_processes, process_id
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--process-id {i} must be between 0 and --num-processes - 1 ({n - 1})")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--coordinator {coordinator}: expected HOST:PORT, e.g. "
                         "10.0.0.1:1234")
    # A process that cannot reach the coordinator would wait, then abort inside
    # XLA without a word; check the address first, and name it.
    if i != 0 and not wait_for_port(coordinator, timeout):
        raise InputError(f"could not reach the coordinator at {coordinator} within "
                         f"{timeout:g}s: start process 0 there (it listens on "
                         "that port), check the address and the firewall")
    jax.distributed.initialize(coordinator, n, i,
                               initialization_timeout=int(timeout),
                               heartbeat_timeout_seconds=int(timeout))
    return True


def lost_processes():
    """The processes the coordinator no longer hears from, in words. Of two,
    the other one; of more, the coordinator is asked, which takes up to
    --coordinator-timeout (its client's get_live_nodes is not public API: used
    only to name the lost process in an error message)."""
    if jax.process_count() == 2:
        return str(1 - jax.process_index())
    try:
        from jax._src import distributed
        live = distributed.global_state.client.get_live_nodes(list(range(jax.process_count())))
        return ", ".join(str(i) for i in range(jax.process_count()) if i not in live) or "?"
    except Exception:  # noqa: BLE001
        return "? (JAX's own message above names it)"


def any_process(*flags):
    """Each flag, made true on every process if it is true on any (a
    collective when there are several processes: all must call it at the
    same point). -> a tuple of bools."""
    flags = np.asarray(flags, np.int32)
    if jax.process_count() > 1:
        flags = np.any(multihost_utils.process_allgather(flags), axis=0)
    return tuple(bool(f) for f in flags)


def from_process_0(value):
    """Process 0's value of an integer, on every process."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))
