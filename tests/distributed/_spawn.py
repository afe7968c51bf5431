"""Run a function in N local processes wired for torch.distributed (gloo on 127.0.0.1).

    from tests.distributed._spawn import spawn
    results = spawn(_worker, world_size=2, args=(cfg,))   # [result of rank 0, result of rank 1]

`fn(rank, world_size, *args)` must be a module-level function (the children are started with
the "spawn" method, which pickles it by qualified name). The environment a launcher such as
torchrun would provide is set before `fn` runs: MASTER_ADDR, MASTER_PORT (a free port),
RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, plus OMP_NUM_THREADS=1 and DS_ACCELERATOR=cpu.
`fn` creates the process group itself (so the code under test does its own set-up); if it
leaves one initialised, the helper destroys it after `fn` returns.

Return values travel back through a pipe, so they must be picklable: prefer plain values
(floats, lists, dicts, numpy arrays, CPU tensors). An exception in any rank is re-raised in
the parent with that rank's traceback; a rank that hangs is killed after `timeout` seconds.
"""

import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import socket
import time
import traceback

__all__ = ["free_port", "spawn"]


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, args, extra_env, conn):
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        # Several ranks share two cores: more threads per rank would only oversubscribe.
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
    }
    env.update(extra_env or {})
    os.environ.update(env)
    try:
        import torch

        torch.set_num_threads(1)
        result = fn(rank, world_size, *args)
        conn.send(("ok", result))
    except BaseException:  # noqa: BLE001 - everything must reach the parent, even SystemExit
        conn.send(("error", traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the result is already sent; tear-down is best effort
            pass
        conn.close()


def spawn(fn, world_size, args=(), timeout=120.0, env=None):
    """Run `fn(rank, world_size, *args)` in `world_size` processes; return their results by rank.

    Raises RuntimeError naming the failing rank(s) with their tracebacks, or TimeoutError when a
    rank has not answered within `timeout` seconds (all children are then killed).
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    procs, conns = [], []
    for rank in range(world_size):
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=_child,
            args=(fn, rank, world_size, port, tuple(args), env, child_conn),
            # Not daemonic: a rank may start its own workers (DataLoader num_workers > 0), which
            # daemonic processes cannot. The finally-block below kills whatever is left.
            daemon=False,
        )
        p.start()
        child_conn.close()
        procs.append(p)
        conns.append(parent_conn)

    results = [None] * world_size
    errors = {}
    pending = set(range(world_size))
    deadline = time.monotonic() + timeout
    try:
        # Watch every rank at once: a rank that fails usually leaves the others blocked in a
        # collective, so its error must be seen without waiting for rank 0 first.
        while pending and not errors:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"spawn({getattr(fn, '__name__', fn)}, world_size={world_size}): rank(s) "
                    f"{sorted(pending)} gave no result within {timeout:.0f} s"
                )
            ready = mp_connection.wait([conns[r] for r in pending], timeout=0.2)
            for rank in sorted(pending):
                conn = conns[rank]
                if conn in ready:
                    try:
                        status, value = conn.recv()
                    except EOFError:
                        procs[rank].join(timeout=5)
                        status, value = "error", f"exited with code {procs[rank].exitcode} before sending a result"
                elif not procs[rank].is_alive() and not conn.poll(0):
                    status, value = "error", f"exited with code {procs[rank].exitcode} before sending a result"
                else:
                    continue
                pending.discard(rank)
                if status == "ok":
                    results[rank] = value
                else:
                    errors[rank] = value
    finally:
        for p in procs:
            p.join(timeout=0.5 if errors else max(1.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for conn in conns:
            conn.close()

    if errors:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise RuntimeError(f"spawn({getattr(fn, '__name__', fn)}, world_size={world_size}) failed:\n{msg}")
    return results
