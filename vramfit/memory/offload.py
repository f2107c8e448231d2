"""trl's activation offloading in the allocation replay (`SFTConfig(activation_offloading=True)`; see
vramfit.memory.levers): trl's context manager with its offloading class emulated, host copies as
sizes in a model of torch's caching host allocator, and the CUDA stream each device block is
allocated on.

trl's OffloadActivations (use_streams=True) brings an offloaded activation back in the backward with
`.to("cuda", non_blocking=True)` inside `torch.cuda.stream(self.s1)`, its copy stream: the block is
allocated while s1 is the current stream, so torch's caching allocator takes it from s1's pool and,
freed, puts it back there (BlockComparatorSize orders free blocks by stream first; get_free_block
looks up (stream, size)): a block or segment made for s1 never serves the default stream, whose
work (the rest of the backward, the clip, the optimizer step) must find or cudaMalloc its own.
The copy stream's segments stay reserved, free, until trl's context re-enters at the next step
(empty_cache).  `_OffloadEmulation` records which allocations are the copy stream's (`streams`:
allocation id -> COPY_STREAM) and `StreamAllocator` / `simulate_streams` replay the events with one
pool pair per stream in one device address space.  Measured (H100, 2026-12-07d): qwen2.5-0.5b full
fine-tuning under trl's fused head with offloading, reserved 5744 MiB, single-pool replay 5618
(-2.19%, its peak in the optimizer step), per-stream replay 5774; the six other offloading runs
move by at most 0.4 points.  Not modelled: record_stream's deferred free (a brought-back block
whose storage a backward output or checkpoint's recompute still views is `record_stream(s0)`-ed
and freed only once the default stream has passed that point, which depends on how far the GPU
lags the CPU)."""

from __future__ import annotations

from vramfit.memory.allocator import CachingAllocator, _Pool

OFFLOAD_MIN_BYTES = 1024  # trl get_act_offloading_ctx_manager's min_offload_size
OFFLOAD_STASH = 5  # its max_fwd_stash_size
DEFAULT_STREAM, COPY_STREAM = 0, 1  # the compute stream (s0), trl's copy stream (s1)


class StreamAllocator(CachingAllocator):
    """The caching allocator with one (small, large) pool pair per CUDA stream: a block allocated on
    a stream goes back, freed, to that stream's pool, and only that stream's requests take it (or
    split its segment).  All streams' segments share the device's address space and the totals
    (allocated, reserved, their peaks); empty_cache and the release before an allocation retry
    free the whole free segments of every stream.  `streams`: allocation id -> stream (absent: the
    default stream)."""

    def __init__(self, expandable_segments: bool = False, limit_bytes: int | None = None,
                 streams: dict | None = None):
        super().__init__(expandable_segments, limit_bytes)
        self.streams = streams if streams is not None else {}
        self.stream_pools = {DEFAULT_STREAM: self.pools}
        self.stream_of_live: dict = {}  # allocation id -> its stream, while live

    def _use(self, stream: int) -> None:
        pools = self.stream_pools.get(stream)
        if pools is None:
            pools = self.stream_pools[stream] = {True: _Pool(True), False: _Pool(False)}
        self.pools = pools

    def apply(self, ev, live: dict) -> None:
        if ev[0] == "a":
            stream = self.streams.get(ev[1], DEFAULT_STREAM)
            if stream != DEFAULT_STREAM:
                self._use(stream)
                try:
                    live[ev[1]] = self.malloc(ev[2])
                finally:
                    self.pools = self.stream_pools[DEFAULT_STREAM]
                self.stream_of_live[ev[1]] = stream
            else:
                live[ev[1]] = self.malloc(ev[2])
        elif ev[0] == "e":
            self.empty_cache()
        else:
            stream = self.stream_of_live.pop(ev[1], DEFAULT_STREAM)
            if stream != DEFAULT_STREAM:
                self._use(stream)
                try:
                    self.free(live.pop(ev[1]))
                finally:
                    self.pools = self.stream_pools[DEFAULT_STREAM]
            else:
                self.free(live.pop(ev[1]))

    def _each_stream(self, fn) -> None:
        current = self.pools
        try:
            for pools in list(self.stream_pools.values()):
                self.pools = pools
                fn()
        finally:
            self.pools = current

    def _release_whole_segments(self) -> None:
        self._each_stream(super()._release_whole_segments)

    def release_cached_blocks(self) -> None:
        self._each_stream(super().release_cached_blocks)

    def state(self, live: dict) -> tuple:
        parts = []
        self._each_stream(lambda: parts.append(super(StreamAllocator, self).state(live)))
        return tuple(parts) + (tuple(sorted(self.stream_of_live.items())),)


def simulate_streams(events, streams: dict | None = None, expandable_segments: bool = False,
                     limit_bytes: int | None = None, initial_allocated: int = 0) -> dict:
    """vramfit.memory.allocator.simulate with the allocations `streams` names (id -> stream: the copy
    stream's, `Levers.streams()`) in their own stream's pools; the same result keys."""
    from vramfit.memory.allocator import run

    return run(StreamAllocator(expandable_segments, limit_bytes, streams), events, initial_allocated)


class PinnedHost:
    """torch's CachingHostAllocator for pinned memory: blocks rounded up to a power of two, freed
    ones cached per size and reused, none released."""

    def __init__(self):
        self.free: dict = {}
        self.reserved = 0
        self.live = 0
        self.peak_live = 0
        self.copied = 0

    def alloc(self, nbytes: int) -> int:
        size = 1 if nbytes <= 1 else 1 << (int(nbytes) - 1).bit_length()
        if self.free.get(size):
            self.free[size] -= 1
        else:
            self.reserved += size
        self.live += size
        self.peak_live = max(self.peak_live, self.live)
        self.copied += nbytes
        return size

    def release(self, size: int) -> None:
        self.free[size] = self.free.get(size, 0) + 1
        self.live -= size

    def summary(self) -> dict:
        return {"pinned_bytes": self.reserved, "peak_live_bytes": self.peak_live, "offloaded_bytes": self.copied}


class _Host:
    """A host copy (its pinned block), freed to the caching allocator when it dies."""

    __slots__ = ("pool", "size", "numel", "dtype", "__weakref__")

    def __init__(self, pool: PinnedHost, numel: int, dtype, nbytes: int):
        self.pool, self.numel, self.dtype = pool, numel, dtype
        self.size = pool.alloc(nbytes)

    def __del__(self):
        self.pool.release(self.size)


def _offload_class():
    import torch
    from torch.autograd.graph import saved_tensors_hooks

    class _OffloadEmulation(saved_tensors_hooks):
        """trl.models.activation_offloading.OffloadActivations (trl 1.16, use_streams=True,
        use_pin_memory=True) on the meta device: the same bookkeeping, the host copies `_Host`
        records, the copies back to the GPU new meta tensors (recorded)."""

        def __init__(self, use_pin_memory=True, use_streams=True, min_offload_size=OFFLOAD_MIN_BYTES,
                     max_fwd_stash_size=OFFLOAD_STASH, pinned=None, rec=None, addresses=None, streams=None):
            self.pinned, self.rec, self.addresses = pinned or PinnedHost(), rec, addresses
            self.streams = streams if streams is not None else {}  # allocation id -> COPY_STREAM
            self.min_bytes, self.max_stash = min_offload_size, max_fwd_stash_size
            self.tracker: dict = {}
            self.tensor_id = 0
            self.is_first_forward_call = True
            self.is_first_backward_call = True
            self.storage_to_tensor_id: dict = {}
            self.key_by_id: dict = {}
            self.param_storages: set = set()
            self.fwd_stash: dict = {}
            self.bwd_tensor_stash: dict = {}
            self.bwd_ev_stash: set = set()
            self.curr_graph_id = None
            self.curr_autograd_node = None

            def where(t):
                """The storage's address (the allocator model's), or its allocation id, or its identity."""
                cdata = t.untyped_storage()._cdata
                owner = self.rec.live.get(cdata) if self.rec is not None else None
                addr = self.addresses.addr(owner) if self.addresses is not None and owner is not None else None
                if addr is not None:
                    return ("addr", addr)
                return ("id", owner) if owner is not None else ("cdata", cdata)

            self._where = where

            def storage_key(t):
                # trl keys a storage by its address (data_ptr + storage offset, dtype), and the key of
                # an offloaded tensor it made contiguous (a copy) is the original's, whose storage may
                # die while the key lingers (until its stash entry goes): a later saved tensor the
                # caching allocator puts at that address then matches it and stays on the GPU.  The
                # address is the allocator model's (`Addresses`: the recording so far replayed);
                # without one, the recorder's allocation id (never reused: no such match)
                w = where(t)
                if w[0] == "addr":
                    return ("addr", w[1] + t.storage_offset(), t.dtype)
                return (w, t.storage_offset(), t.dtype)

            def track(key, tid):
                self.storage_to_tensor_id[key] = tid
                self.key_by_id[tid] = key

            def release(tid):
                key = self.key_by_id.pop(tid, None)
                if key is not None and self.storage_to_tensor_id.get(key) == tid:
                    del self.storage_to_tensor_id[key]

            def pack(activation):
                if self.is_first_forward_call:
                    self.is_first_forward_call = False
                    self.is_first_backward_call = True
                    self.storage_to_tensor_id, self.key_by_id = {}, {}
                num_bytes = activation.element_size() * activation.nelement()
                self.tensor_id += 1
                tid = self.tensor_id
                key = storage_key(activation)
                if key in self.storage_to_tensor_id:
                    self.tracker[tid] = (activation, False, None)
                    track(key, tid)
                    return tid
                if (activation.device.type != "meta" or num_bytes < self.min_bytes
                        or isinstance(activation, torch.nn.Parameter)
                        or (hasattr(torch.nn, "Buffer") and isinstance(activation, torch.nn.Buffer))
                        or where(activation) in self.param_storages):
                    self.tracker[tid] = (activation, False, None)
                    return tid
                has_broadcast = 0 in activation.stride()
                if not has_broadcast and (not activation.is_contiguous() or activation.storage_offset() != 0):
                    if activation.storage_offset() != 0:
                        activation = activation.clone(memory_format=torch.contiguous_format)
                    else:
                        activation = activation.contiguous()
                for old in list(self.fwd_stash):
                    if old <= tid - self.max_stash:
                        del self.fwd_stash[old]
                        release(old)
                    else:
                        break
                if has_broadcast:
                    nbytes = activation.untyped_storage().nbytes()
                    host = _Host(self.pinned, nbytes // activation.element_size(), activation.dtype, nbytes)
                else:
                    host = _Host(self.pinned, activation.numel(), activation.dtype, num_bytes)
                self.tracker[tid] = (host, True, (activation.stride(), activation.storage_offset(),
                                                  activation.size()))
                self.fwd_stash[tid] = activation
                track(key, tid)
                return tid

            def unpack(tid):
                if self.is_first_backward_call:
                    self.curr_graph_id = torch._C._current_graph_task_id()

                    def wait_and_del_remaining_references():
                        for old in list(self.bwd_tensor_stash):
                            del self.bwd_tensor_stash[old]

                    torch.autograd.variable.Variable._execution_engine.queue_callback(
                        wait_and_del_remaining_references)
                    self.is_first_backward_call = False
                if tid not in self.tracker:
                    raise ValueError(f"untracked tensor with id {tid}")
                held, modified, layout = self.tracker[tid]
                if modified:
                    graph_id = torch._C._current_graph_task_id()
                    node = torch._C._current_autograd_node()
                    prev_node_ids = []
                    if graph_id == self.curr_graph_id and self.curr_autograd_node != node:
                        self.curr_autograd_node = node
                        prev_node_ids = list(self.bwd_tensor_stash)
                    brought_back = True
                    refcount = 0
                    if tid in self.fwd_stash:
                        held = self.fwd_stash[tid]
                        brought_back = False
                    else:
                        stride, offset, shape = layout
                        # .to("cuda", non_blocking=True) under torch.cuda.stream(s1): a block of s1's pool
                        back = torch.empty((held.numel,), dtype=held.dtype, device="meta")
                        owner = self.rec.live.get(back.untyped_storage()._cdata) if self.rec is not None else None
                        if owner is not None:
                            self.streams[owner] = COPY_STREAM
                        back = torch.as_strided(back, size=shape, stride=stride, storage_offset=offset)
                        held = back
                        del back
                        self.bwd_tensor_stash[tid] = held
                        refcount = torch._C._storage_Use_Count(held.untyped_storage()._cdata)

                    def hook(outputs, inputs):
                        if brought_back and tid in self.bwd_tensor_stash:
                            count = torch._C._storage_Use_Count(self.bwd_tensor_stash[tid].untyped_storage()._cdata)
                            if count > refcount:  # record_stream(s0): freed with its last user
                                del self.bwd_tensor_stash[tid]
                            else:
                                self.bwd_ev_stash.add(tid)
                        for old in list(self.fwd_stash):
                            del self.fwd_stash[old]
                            release(old)
                        for old in prev_node_ids:
                            self.bwd_ev_stash.discard(old)
                            self.bwd_tensor_stash.pop(old, None)
                        return outputs

                    node.register_hook(hook)
                del self.tracker[tid]
                release(tid)
                if not self.tracker:
                    self.is_first_forward_call = True
                return held

            super().__init__(pack, unpack)

        def update_model_params(self, model):
            # trl: the parameters' data_ptrs when the context is made; a parameter replaced later (QLoRA's
            # bias cast at the first forward) leaves its address in the set, where a later activation
            # the caching allocator puts there is then taken for a parameter (kept on the GPU)
            self.param_storages = {self._where(p) for p in model.parameters()}

        def __enter__(self):
            self.tracker.clear()
            self.storage_to_tensor_id.clear()
            self.key_by_id.clear()
            self.tensor_id = 0
            self.is_first_forward_call = True
            self.is_first_backward_call = True
            self.bwd_tensor_stash.clear()
            self.bwd_ev_stash.clear()
            self.fwd_stash.clear()
            if self.rec is not None:  # "bitsandbytes" in sys.modules (peft / trl import it): empty_cache
                self.rec.events.append(("e",))
            return super().__enter__()

        def __exit__(self, *args):
            try:
                self.bwd_tensor_stash.clear()
                self.bwd_ev_stash.clear()
                self.fwd_stash.clear()
            finally:
                result = super().__exit__(*args)
            return result

    return _OffloadEmulation


class Addresses:
    """Where the caching allocator model (`StreamAllocator`: the copy stream's blocks in its own pools)
    puts each recorded allocation: the recorder's events so far replayed through it, on demand (the
    stream before the steps' gradient sums are made in place, `events._sum_in_place`: a few backward
    blocks apart).  `streams`: the emulation's allocation id -> stream table (shared, filled as it records)."""

    def __init__(self, rec, expandable: bool, streams: dict | None = None):
        self.rec, self.live, self.done, self.events = rec, {}, 0, None
        self.alloc = StreamAllocator(expandable, streams=streams)

    def addr(self, event_id: int) -> int | None:
        events = self.rec.events
        if events is not self.events:  # the recorder started another stream (the rest of the run)
            return None
        for ev in events[self.done:]:
            self.alloc.apply(ev, self.live)
        self.done = len(events)
        block = self.live.get(event_id)
        return None if block is None else block.addr


def make_offloading(model, rec, pinned, addresses=None, streams=None):
    """trl's get_act_offloading_ctx_manager(model) (its output-head no-op hooks for real) around
    `_OffloadEmulation` (`streams`: the table it fills with the copy stream's allocations)."""
    import functools
    from trl.models import activation_offloading as ao

    from vramfit.memory.liger import quiet_logger

    cls = _offload_class()
    orig = ao.OffloadActivations
    ao.OffloadActivations = functools.partial(cls, pinned=pinned, rec=rec, addresses=addresses, streams=streams)
    try:
        with quiet_logger(ao.__name__):
            return ao.get_act_offloading_ctx_manager(model=model, warn_if_no_head=False)
    finally:
        ao.OffloadActivations = orig
