"""The one place that owns devices, meshes, shardings and the multi-host runtime.

Data parallelism is SPMD with ``jax.jit``: a ``Mesh`` over all devices with axes
``('data', 'model')``; the batch is sharded on ``data``; the train state is replicated,
or, with ``model_axis > 1``, each large parameter (and its optimizer slots and moving
averages) is split along its largest divisible dimension over ``model`` (ZeRO/FSDP
style; XLA inserts the gathers). The same jitted step runs on one CPU, 8 GPUs or a pod
slice. Every process feeds only its local share of the global batch.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"


EXIT_CLUSTER_FAILED = 75  # exit status when the cluster cannot form or a peer is lost


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           *, auto: bool = False, timeout_s: int = 300,
                           heartbeat_timeout_s: int = 60) -> None:
    """Joins (or forms) a multi-process JAX cluster.

    With ``coordinator_address`` the cluster is described explicitly (e.g. two processes
    on 127.0.0.1); with ``auto`` JAX detects it (Cloud TPU, SLURM, Open MPI). A process
    that cannot reach the coordinator within ``timeout_s`` raises instead of hanging; if
    the cluster still has not formed after ``timeout_s`` (process 0 alone, or a port
    that is not a JAX coordinator), the process exits with status 75 and a message that
    names the address, instead of XLA's native abort.

    Once formed, a lost process, the coordinator included, ends every survivor with
    status 75 and one line naming what was lost and what to do: at once when a collective
    or XLA's abort reports it (``_exit_on_cluster_loss``), else through the
    ``PeerWatchdog`` within ``heartbeat_timeout_s`` (+5 s).
    """
    if not coordinator_address and not auto:
        return
    # CPU collectives across processes need gloo (GPUs and TPUs ignore this). Asking for
    # the backend here would initialise it too early, so set it unconditionally.
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # noqa: BLE001 (option absent on some builds)
        pass
    # JAX's own limits sit above ours, so that ours fire first with a clear message.
    import inspect

    kwargs: dict[str, Any] = {"initialization_timeout": int(timeout_s) + 60}
    if "heartbeat_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
        kwargs["heartbeat_timeout_seconds"] = int(heartbeat_timeout_s) + 30  # jax >= 0.7
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id.")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} is not in [0, {num_processes}).")
        kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id)
    start = time.time()
    if coordinator_address and process_id != 0:
        # XLA aborts the process (no Python exception) when the coordinator stays
        # unreachable; check reachability first so the failure is a clear error.
        _wait_for_coordinator(coordinator_address, timeout_s)
    where = (f"coordinator {coordinator_address or 'auto-detected'}, process {process_id} of "
             f"{num_processes}")
    guard = threading.Timer(timeout_s, _exit_with, args=(
        f"The JAX cluster did not form within {timeout_s}s ({where}): the other processes "
        "did not join, or the address is not a JAX coordinator. Check that every process "
        "was started with the same --coordinator_address and --num_processes.",))
    guard.daemon = True
    guard.start()
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 (re-raised with context)
        raise RuntimeError(
            f"Could not form the JAX cluster ({where}) within {timeout_s}s "
            f"({time.time() - start:.0f}s elapsed): {e}") from e
    finally:
        guard.cancel()
    logging.info("JAX cluster: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    if jax.process_count() > 1:
        from jax._src import distributed

        address = coordinator_address or distributed.global_state.coordinator_address or "?"
        _exit_on_cluster_loss(address)
        if hasattr(distributed.global_state.client, "key_value_increment"):
            PeerWatchdog(heartbeat_timeout_s, address).start()
        else:  # older jaxlib: JAX's own heartbeat (and its native abort) is all there is
            logging.warning("This jaxlib's coordination client has no key_value_increment: "
                            "no peer watchdog; a lost process ends the others natively.")


_exiting = threading.Lock()


def _exit_with(message: str, status: int = EXIT_CLUSTER_FAILED) -> None:
    """Ends the process at once with ``status`` and one line ``ERROR: message``.

    Called from watchdog threads, exception hooks and the SIGABRT hook: the main thread
    may be blocked in a collective or in XLA, where no exception reaches it, and a normal
    exit would wait for Orbax's save threads, which only add tracebacks of the same loss.
    The first caller wins; any later one (another thread noticing the same loss) waits
    here until the process is gone, so exactly one line is printed, and printed last.
    """
    _exiting.acquire()
    # os.write, not print: sys.stderr's lock may be held by a thread that never returns.
    os.write(2, f"ERROR: {message}\n".encode(errors="replace"))
    os._exit(status)


RESTART = "Restart the whole job: it resumes from the newest checkpoint."
# How a collective or the coordination service fails once a peer process is gone (gloo on
# CPU; the coordination service's RPCs everywhere). A gloo transport error is never the
# program's own fault, so any of them counts.
_GLOO_LOSS = re.compile(r"Gloo \w+ failed|gloo/transport", re.IGNORECASE)
_SERVICE_LOSS = re.compile(r"UNAVAILABLE: .*coordination service|coordination service.*"
                           r"(Socket closed|Connection reset|failed to connect)",
                           re.IGNORECASE | re.DOTALL)


def cluster_failure(exc: BaseException | None) -> str | None:
    """The first line of the error in ``exc`` (or its causes) that says a collective or
    the coordination service lost a peer process, or None if none does."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if _GLOO_LOSS.search(text) or _SERVICE_LOSS.search(text):
            line = next((x for x in text.splitlines() if x.strip()), text)
            return " ".join(line.split())[:240]
        exc = exc.__cause__ or exc.__context__
    return None


def lost_peer_message(detail: str, me: int, n: int, address: str,
                      coordinator_gone: Callable[[], bool]) -> str:
    """The line that ends a survivor: the coordinator when it is the only other process or
    ``coordinator_gone()`` says this process cannot reach it, else the other processes
    (named exactly when there is only one other). ``coordinator_gone`` (a probe that can
    take seconds) is called only when its answer decides the line."""
    if me != 0 and (n == 2 or coordinator_gone()):
        return (f"Lost the JAX coordinator (process 0 at {address}): {detail}. Stopping "
                f"process {me} of {n}. {RESTART}")
    others = [p for p in range(n) if p != me]
    who = (f"process(es) {others[0]}" if len(others) == 1 else
           f"one or more of processes {', '.join(map(str, others))}")
    return (f"Lost {who} of the {n}-process cluster ({detail}); stopping process {me}. "
            f"{RESTART}")


def _reachable(address: str, timeout_s: float = 2.0) -> bool:
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _coordinator_gone(address: str, settle_s: float = 1.5, every_s: float = 0.25) -> bool:
    """Whether the coordinator no longer accepts connections, probed until ``settle_s``
    has passed: a peer's broken collective can reach this process a moment before a
    killed coordinator's listening socket is closed, so one answer is not proof it lives."""
    deadline = time.time() + settle_s
    while _reachable(address):
        if time.time() >= deadline:
            return False
        time.sleep(every_s)
    return True


def _exit_on_cluster_loss(address: str) -> None:
    """Makes a lost peer end this process with status 75 and one line, whoever notices
    first: the main thread (an uncaught collective failure, via ``sys.excepthook``), a
    background thread such as Orbax's save threads (``threading.excepthook``), or, on
    processes other than 0, XLA's native abort when the coordinator dies (a SIGABRT hook,
    see ``_hook_abort``)."""
    import sys

    me, n = jax.process_index(), jax.process_count()

    def end_if_lost(exc: BaseException | None) -> None:
        detail = cluster_failure(exc)
        if detail is not None:
            _exit_with(lost_peer_message(detail, me, n, address,
                                         lambda: _coordinator_gone(address)))

    previous_sys, previous_thread = sys.excepthook, threading.excepthook

    def sys_hook(kind, value, tb):
        end_if_lost(value)
        previous_sys(kind, value, tb)

    def thread_hook(args):
        end_if_lost(args.exc_value)
        previous_thread(args)

    sys.excepthook, threading.excepthook = sys_hook, thread_hook
    if me != 0:
        _hook_abort(lambda: _exit_with(lost_peer_message(
            "it stopped answering, and JAX's distributed runtime aborted this process",
            me, n, address, lambda: True)), address)


_abort_hook = None  # the installed C handler; kept referenced so it is never collected


def _hook_abort(on_lost_coordinator: Callable[[], None], address: str) -> None:
    """When the coordinator (process 0) dies, JAX's coordination client aborts every other
    process from a C++ thread (LOG(FATAL) in xla/pjrt/distributed/client.h) within a
    fraction of a second, before any Python code notices. The hook JAX has for this,
    ``missed_heartbeat_callback``, cannot take a Python callable (jaxlib 0.10.2 cannot
    convert its absl::Status argument: std::terminate), so the abort itself is caught: a
    SIGABRT handler that, if the coordinator no longer accepts connections, ends the
    process with status 75 and the coordinator line. Any other abort gets the thread dump
    faulthandler would have printed and goes on (status 134)."""
    global _abort_hook
    import ctypes
    import faulthandler
    import signal
    import sys

    dump = faulthandler.is_enabled()

    def on_abort(signum: int) -> None:
        del signum
        if _coordinator_gone(address):
            on_lost_coordinator()
        if dump:
            sys.stderr.write("Fatal Python error: Aborted\n\n")
            faulthandler.dump_traceback(all_threads=True)

    try:
        libc = ctypes.CDLL(None)
        handler_type = ctypes.CFUNCTYPE(None, ctypes.c_int)
        libc.signal.argtypes, libc.signal.restype = [ctypes.c_int, handler_type], ctypes.c_void_p
        _abort_hook = handler_type(on_abort)
        if libc.signal(signal.SIGABRT, _abort_hook) == ctypes.c_void_p(-1).value:
            raise OSError("signal() failed")
    except (OSError, AttributeError) as e:
        logging.warning("No SIGABRT hook (%s): a lost coordinator ends this process with "
                        "JAX's native abort (status 134).", e)


class PeerWatchdog(threading.Thread):
    """Ends this process when another process of the cluster stops beating.

    Every ``timeout_s / 6`` seconds each process bumps its own counter in the
    coordination service's key-value store and reads the others'. A peer whose counter
    has not moved for ``timeout_s`` (by this process's clock, so clock skew does not
    matter), or a coordinator that stops answering, ends this process with status 75 and
    a message naming the lost process(es), instead of a hang in the next collective or
    XLA's native abort.
    """

    def __init__(self, timeout_s: float, address: str):
        super().__init__(name="peer-watchdog", daemon=True)
        self.timeout_s, self.address = float(timeout_s), address
        self.interval = max(0.5, self.timeout_s / 6)

    def run(self) -> None:
        from jax._src import distributed

        client = distributed.global_state.client
        me, n = jax.process_index(), jax.process_count()
        last_value: dict[int, str] = {}
        last_change: dict[int, float] = {p: time.time() for p in range(n)}
        failing_since = None
        while True:
            now = time.time()
            try:
                client.key_value_increment(f"alp_jax/heartbeat/{me}", 1)
                for p in range(n):
                    if p == me:
                        continue
                    try:
                        value = client.key_value_try_get(f"alp_jax/heartbeat/{p}")
                    except Exception:  # noqa: BLE001 (not written yet)
                        value = None
                    if value is not None and value != last_value.get(p):
                        last_value[p], last_change[p] = value, now
                failing_since = None
            except Exception as e:  # noqa: BLE001 (the coordinator itself is unreachable)
                failing_since = failing_since or now
                if now - failing_since > self.timeout_s:
                    _exit_with(lost_peer_message(
                        f"no answer for {now - failing_since:.0f}s: "
                        f"{str(e).splitlines()[0][:200]}", me, n, self.address, lambda: True))
            lost = [p for p in range(n) if p != me and now - last_change[p] > self.timeout_s]
            if lost:
                _exit_with(f"Lost process(es) {', '.join(map(str, lost))} of the {n}-process "
                           f"cluster (no heartbeat for over {self.timeout_s:.0f}s); stopping "
                           f"process {me}. {RESTART}")
            time.sleep(self.interval)


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator_address {address!r} must look like host:port.")
    deadline = time.time() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as e:
            if time.time() >= deadline:
                raise RuntimeError(
                    f"Could not reach the JAX coordinator at {address} within {timeout_s}s "
                    f"({e}). Start process 0 first, and check the address and port.") from e
            time.sleep(0.5)


def make_mesh(model_axis: int = 1, devices: list[Any] | None = None) -> Mesh:
    """A ``('data', 'model')`` mesh over all (or the given) devices."""
    devices = list(devices if devices is not None else jax.devices())
    if model_axis < 1 or len(devices) % model_axis:
        raise ValueError(f"mesh_model_axis {model_axis} must be >= 1 and divide the device "
                         f"count {len(devices)}.")
    grid = np.asarray(devices, dtype=object).reshape(len(devices) // model_axis, model_axis)
    return Mesh(grid, (DATA, MODEL))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_global_batch(global_batch: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the data axis and the processes."""
    n = mesh.shape[DATA]
    if global_batch % n:
        raise ValueError(
            f"Global batch size {global_batch} does not divide by the {n} devices of the "
            f"data axis; use a multiple of {n} (batch_size * num_replicas).")
    if global_batch % jax.process_count():
        raise ValueError(f"Global batch size {global_batch} does not divide by the "
                         f"{jax.process_count()} processes.")


def _param_spec(x: Any, model_size: int) -> PartitionSpec:
    shape = getattr(x, "shape", ())
    if model_size == 1 or not shape or np.prod(shape) < 2**14:
        return PartitionSpec()
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % model_size == 0:
            spec = [None] * len(shape)
            spec[d] = MODEL
            return PartitionSpec(*spec)
    return PartitionSpec()


def state_sharding(state: Any, mesh: Mesh) -> Any:
    """Shardings for a train state (or any pytree of arrays / ShapeDtypeStructs)."""
    model_size = mesh.shape[MODEL]
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, _param_spec(x, model_size)),
                                  state)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's local batch into global arrays sharded on ``data``."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def prefetch_to_mesh(iterator: Iterator[dict[str, np.ndarray]], mesh: Mesh,
                     size: int = 2) -> Iterator[dict[str, jax.Array]]:
    """Keeps ``size`` batches in flight on the devices (transfers overlap the step)."""
    import collections

    queue: collections.deque = collections.deque()
    for batch in iterator:
        queue.append(global_batch(batch, mesh))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def jit_train_step(step_fn: Callable, state_shardings: Any, mesh: Mesh) -> Callable:
    """``step_fn(state, images, labels)`` jitted with the state donated and sharded."""
    data, rep = batch_sharding(mesh), replicated(mesh)
    return jax.jit(step_fn, in_shardings=(state_shardings, data, data),
                   out_shardings=(state_shardings, rep), donate_argnums=(0,))


def put_replicated(tree: Any, shardings: Any) -> Any:
    """Places host arrays (identical on every process) onto the given shardings."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s,
                                                  lambda idx, x=x: np.asarray(x)[idx]),
        tree, shardings)
