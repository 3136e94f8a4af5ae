"""Where the heavy steps run: ``local`` (this process) or ``ray`` (Ray Data; local Ray, or a cluster address).

Two primitives, both deterministic and ordered so that the engines give the same results on the same seed:

* ``map_rows(fn, n, payload, *args)``: ``fn(payload, idx, *args)`` returns a dict of arrays with one row per
  index; the rows come back in index order (embedding, per-example scoring, k-means assignment).
* ``map_blocks(fn, n, payload, *args)``: ``fn`` returns one summary per block (k-means partial sums); the
  summaries come back in block order, to be reduced by the caller (on Ray: one task per block, since a
  k-means needs many short passes).
* ``run_tasks(fn, args_list)``: independent tasks (one short training run per seed), results in order.

With Ray, the payload is put in the object store once and read zero-copy by the workers; rows are a
``ray.data.range(n)`` data set mapped with ``map_batches``.
"""

from __future__ import annotations

import numpy as np

from prunekit.errors import PruneError
from prunekit.core.progress import bar as progress_bar

ENGINES = ("local", "ray")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _with_threads(fn, threads, *args):
    import torch

    torch.set_num_threads(threads)
    return fn(*args)


class LocalEngine:
    name = "local"

    def __init__(self, block_size: int = 4096):
        self.block_size = block_size

    def put(self, obj):
        return obj

    def _blocks(self, n):
        return [np.arange(s, min(n, s + self.block_size)) for s in range(0, n, self.block_size)]

    def map_rows(self, fn, n, payload, *args, progress: str | None = None):
        outs = []
        blocks = self._blocks(n)
        if progress:
            blocks = progress_bar(blocks, desc=progress, unit="block")
        for idx in blocks:
            outs.append(fn(payload, idx, *args))
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]} if outs else {}

    def map_blocks(self, fn, n, payload, *args):
        return [fn(payload, idx, *args) for idx in self._blocks(n)]

    def run_tasks(self, fn, args_list, progress: str | None = None):
        it = args_list
        if progress:
            it = progress_bar(args_list, desc=progress, unit="run")
        return [fn(*a) for a in it]


_RAY_CACHE: dict = {}


def _ray_batch(batch, fn, ref, args, per_row):
    import ray

    key = ref.hex()
    if key not in _RAY_CACHE:
        _RAY_CACHE.clear()
        _RAY_CACHE[key] = ray.get(ref)
    idx = np.asarray(batch["id"], dtype=np.int64)
    out = fn(_RAY_CACHE[key], idx, *args)
    if per_row:
        res = {"_order": idx}
        res.update({f"c_{k}": np.asarray(v) for k, v in out.items()})
    else:  # one summary row per block: wrap every value in a leading axis of 1
        res = {"_order": idx[:1]}
        res.update({f"c_{k}": np.asarray(v)[None] for k, v in out.items()})
    return res


def _ray_block(fn, payload, start, stop, args):
    return fn(payload, np.arange(start, stop), *args)


class RayEngine:
    name = "ray"

    def __init__(self, address: str | None = None, block_size: int = 4096, num_cpus: int | None = None):
        try:
            import ray
            import ray.data  # noqa: F401
        except ImportError as e:
            raise PruneError("--engine ray needs Ray Data; run `pip install 'prunekit[ray]'` (or 'ray[data]').") from e
        self.ray = ray
        self.block_size = block_size
        if not ray.is_initialized():
            kw = dict(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            try:
                if address:
                    ray.init(address=address, **kw)
                else:
                    ray.init(num_cpus=num_cpus, **kw)
            except Exception as e:  # a wrong address, a dead cluster
                raise PruneError(f"Cannot start or reach Ray ({type(e).__name__}: {e}); check --ray-address.") from e
        self._block_task = None
        import logging

        logging.getLogger("ray.data").setLevel(logging.ERROR)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = True

    def put(self, obj):
        return self.ray.put(obj)

    def _run(self, fn, n, ref, args, per_row):
        ds = self.ray.data.range(n, override_num_blocks=max(1, -(-n // self.block_size)))
        ds = ds.map_batches(_ray_batch, batch_size=self.block_size, batch_format="numpy",
                            fn_kwargs=dict(fn=fn, ref=ref, args=args, per_row=per_row))
        parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
        if not parts:
            return {}
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(cols.pop("_order"), kind="stable")
        return {k[2:]: v[order] for k, v in cols.items()}

    def map_rows(self, fn, n, payload, *args, progress: str | None = None):
        return self._run(fn, n, payload, args, True)

    def map_blocks(self, fn, n, payload, *args):
        # many short passes (k-means iterations): plain Ray tasks over the same blocks, no per-pass pipeline
        if self._block_task is None:
            self._block_task = self.ray.remote(num_cpus=1)(_ray_block)
        starts = range(0, n, self.block_size)
        args_ref = self.ray.put(args)
        return self.ray.get([self._block_task.remote(fn, payload, s, min(n, s + self.block_size), args_ref)
                             for s in starts])

    def run_tasks(self, fn, args_list, progress: str | None = None):
        task = self.ray.remote(num_cpus=1)(_with_threads)
        refs = [task.remote(fn, _threads(), *[self.ray.put(a) if isinstance(a, np.ndarray) else a for a in args])
                for args in args_list]
        return self.ray.get(refs)


def get_engine(engine="local", address: str | None = None):
    if engine is None or engine == "local":
        return LocalEngine()
    if isinstance(engine, (LocalEngine, RayEngine)):
        return engine
    if engine == "ray":
        return RayEngine(address)
    raise PruneError(f"Unknown engine {engine!r}; use local or ray.")
