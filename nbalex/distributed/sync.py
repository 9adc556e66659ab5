"""A network's gradients averaged across ranks, layer by layer, while backward runs.

:class:`GradSync` ties a :class:`~nbalex.model.Net` to the reducers of
:mod:`nbalex.distributed.reduce` (host buffers: cpu and reference backends) or
:mod:`nbalex.distributed.nccl` (device buffers: cuda).  One bucket per conv/fc layer (its
weight and bias, adjacent in the flat gradient buffer), in backward order; one reducer per
tower (tower t of every rank averages with tower t of the others)::

    sync = GradSync(world, net)
    net.forward_backward(x, labels, seed=s, batch_offset=rank * len(x), grad_sync=sync)
    sync.wait()              # every rank's gradients are now the global batch's mean
    net.sgd_step(lr)         # the same update on every rank

``Net.forward_backward`` calls :meth:`ready` right after a layer's backward-weights (the
bucket starts) and :meth:`progress` between backward stages (MPI advances non-blocking
collectives only inside its calls).  ``wait_seconds`` is the time the last :meth:`wait`
blocked: communication that backward did not hide.
"""

from nbalex.distributed.reduce import HostAllreduce, buckets_from_views


def layer_buckets(net, tower=0):
    """{layer name: bucket index}, and the buckets' element ranges, in backward order."""
    ctx = net._ctxs[tower]
    flat = net._buffers[tower]["grads"]
    names = [stage.step.spec.name for stage in reversed(net._stages) if stage.has_params]
    groups = [[view for key, view in ctx.grads.items() if key.split(".")[0] == name]
              for name in names]
    if any(not group for group in groups):
        raise ValueError("a parameter layer without gradients cannot be reduced")
    if net.backend_name == "cuda":
        ranges = _device_buckets(flat, groups)
    else:
        ranges = buckets_from_views(flat, groups)
    return {name: b for b, name in enumerate(names)}, ranges


def _device_buckets(flat, groups):
    """Element ranges of device views of ``flat`` (through their CUDA array interface)."""
    base = flat.__cuda_array_interface__["data"][0]
    item = flat.dtype.itemsize
    ranges = []
    for group in groups:
        starts = [(v.__cuda_array_interface__["data"][0] - base) // item for v in group]
        stops = [s + v.size for s, v in zip(starts, group)]
        ranges.append((min(starts), max(stops)))
    return ranges


class GradSync:
    """Averages ``net``'s gradients over ``world``'s ranks (see the module docstring)."""

    def __init__(self, world, net):
        self.world, self.net = world, net
        self.index, ranges = layer_buckets(net)
        self.wait_seconds = 0.0
        self.cuda = net.backend_name == "cuda"
        self.reducers = []
        for t, b in enumerate(net._buffers):
            if self.cuda:
                from nbalex.distributed.nccl import NcclAllreduce
                with net._places[t].activate():
                    self.reducers.append(NcclAllreduce(world, b["grads"], ranges))
            else:
                self.reducers.append(HostAllreduce(world, b["grads"], ranges))

    def ready(self, layer_name, tower):
        """Layer ``layer_name``'s gradients on ``tower`` are final: start their allreduce."""
        reducer, bucket = self.reducers[tower], self.index[layer_name]
        if self.cuda:
            reducer.start(bucket, self.net._places[tower].compute_stream)
        else:
            reducer.start(bucket)
        reducer.progress()

    def progress(self):
        for reducer in self.reducers:
            reducer.progress()

    def wait(self):
        """Block (host) or order the compute streams (cuda) until every bucket is averaged."""
        total = 0.0
        for t, reducer in enumerate(self.reducers):
            if self.cuda:
                with self.net._places[t].activate():
                    reducer.wait(self.net._places[t].compute_stream)
            else:
                reducer.wait()
                total += reducer.wait_seconds
        self.wait_seconds = total

    def close(self):
        """Free the reducers' communicators (collective: every rank calls it)."""
        for reducer in self.reducers:
            reducer.close()
        self.reducers = []
