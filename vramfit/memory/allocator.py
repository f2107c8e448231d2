"""A pure-Python model of PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp).

Given a stream of (malloc size) / (free handle) events on one stream and one device, it replays
what `DeviceCachingAllocator` does and reports the peaks torch reports:
`max_memory_allocated` (sum of the sizes of allocated blocks, rounded and unsplit remainders
included), `max_memory_reserved` (bytes cudaMalloc'd, or mapped for expandable segments) and the
number of segments (`num_device_alloc`).

Modelled, as in torch 2.11 with the default `PYTORCH_CUDA_ALLOC_CONF` or `expandable_segments:True`:
- round_size: at least kMinBlockSize (512), rounded up to a multiple of 512 (no roundup_power2);
- pools: requests <= kSmallSize (1 MiB) go to the small pool, larger ones to the large pool;
- get_allocation_size: <= 1 MiB -> one kSmallBuffer (2 MiB) segment, < kMinLargeAlloc (10 MiB)
  -> one kLargeBuffer (20 MiB) segment, else rounded up to kRoundLarge (2 MiB);
- get_free_block: best fit, the first free block of the pool ordered by (size, address) whose
  size >= the request (max_split_size unlimited: no oversize rule);
- should_split: small pool or expandable segments: remainder >= 512; large pool: remainder > 1 MiB
  (an unsplit block is allocated whole, and counted whole in allocated bytes);
- free: the block merges with its free neighbours in the same segment;
- expandable segments: one growing virtual segment per pool, mapped in pages of 2 MiB (small
  pool) or 20 MiB (large pool); a request no free block fits maps pages at the segment's end,
  starting from a free block just before the unmapped tail (find_expandable_block /
  try_allocate_expandable_block / map_block); the request itself, not get_allocation_size,
  is what is mapped.
- memory cap (`limit_bytes`: torch.cuda.set_per_process_memory_fraction, allowed_memory_maximum):
  alloc_block refuses a new segment when reserved + get_allocation_size(request) would exceed the
  cap (the check uses the allocation size also for expandable segments, which then map only the
  request); malloc then calls release_available_cached_blocks (a no-op with the default
  unlimited max_split_size), then release_cached_blocks (cudaFree of every cached free segment
  that is not split; with expandable segments, unmapping the whole pages of every free block) and
  retries once (num_alloc_retries); still refused: out of memory (`OutOfMemory`).
- where cudaMalloc puts a segment: best fit breaks ties between free blocks of one size by address,
  so the order of the segments' addresses decides which of two equal free blocks is reused (and
  what is left to fragment).  The CUDA driver hands out device addresses top-down: a new range
  goes below the lowest one in use, its start aligned down to min(next power of two of its size,
  32 MiB), and the slack this leaves is a hole that later segments fill first, lowest hole first,
  from its start (`_DeviceAddressSpace`; torch memory histories of 19 H100
  runs, driver 580: the segments' addresses and torch's reserved peaks and segment counts follow).
  An earlier model gave new segments increasing addresses, which picks the opposite of two equal
  blocks: up to 5% off the reserved peak on runs with many equal-sized segments.
Not modelled: several streams (record_stream), a cudaMalloc that fails below the cap (the card
is full), garbage collection threshold, CUDA graphs' private pools.  Uncapped, reserved memory
never shrinks here, as in a training loop that never calls empty_cache.
"""

from __future__ import annotations

from bisect import bisect_left, insort

kMinBlockSize = 512
kSmallSize = 1 << 20
kSmallBuffer = 2 << 20
kLargeBuffer = 20 << 20
kMinLargeAlloc = 10 << 20
kRoundLarge = 2 << 20
_VA_SIZE = 1 << 44  # an expandable segment's virtual address space: never exhausted here
_DEVICE_VA_TOP = 1 << 60  # where cudaMalloc's top-down ranges start (above the expandable ones)
_MAX_VA_ALIGN = 32 << 20  # the alignment of a new range: min(next power of two >= size, this)


class OutOfMemory(Exception):
    """A request the capped allocator could not serve even after releasing its cached blocks."""


def round_size(size: int) -> int:
    if size < kMinBlockSize:
        return kMinBlockSize
    return kMinBlockSize * ((size + kMinBlockSize - 1) // kMinBlockSize)


def get_allocation_size(size: int) -> int:
    if size <= kSmallSize:
        return kSmallBuffer
    if size < kMinLargeAlloc:
        return kLargeBuffer
    return kRoundLarge * ((size + kRoundLarge - 1) // kRoundLarge)


class Block:
    __slots__ = ("addr", "size", "allocated", "prev", "next", "small", "mapped", "expandable", "requested")

    def __init__(self, addr, size, small, expandable=False, mapped=True):
        self.addr = addr
        self.size = size
        self.small = small
        self.allocated = False
        self.prev = None
        self.next = None
        self.mapped = mapped
        self.expandable = expandable
        self.requested = 0

    def key(self):
        return (self.size, self.addr)

    def __repr__(self):  # pragma: no cover
        return f"Block(addr={self.addr:#x}, size={self.size}, alloc={self.allocated}, mapped={self.mapped})"


class _Pool:
    """Free mapped blocks ordered by (size, address): BlockComparatorSize on one stream."""

    def __init__(self, small: bool):
        self.small = small
        self.keys: list = []
        self.blocks: dict = {}
        self.unmapped: list = []  # the unmapped blocks of this pool's expandable segments
        self.segment_base = None  # where this pool's expandable segment starts (its pages count from it)

    def insert(self, b: Block):
        k = (b.size, b.addr)
        insort(self.keys, k)
        self.blocks[k] = b

    def erase(self, b: Block):
        k = (b.size, b.addr)
        i = bisect_left(self.keys, k)
        assert self.keys[i] == k
        del self.keys[i]
        del self.blocks[k]

    def lower_bound(self, size: int) -> int:
        return bisect_left(self.keys, (size, -1))


class _DeviceAddressSpace:
    """The device addresses cudaMalloc returns (the CUDA driver's virtual address allocator, as seen
    in torch memory histories on H100, driver 580): a request first fills the lowest hole (slack
    left by alignment) that holds it, at the hole's start; else it goes below the lowest range in
    use, its start aligned down to min(next power of two >= size, 32 MiB), and the slack above it
    becomes a hole.  A range cudaFree returns (empty_cache) is not reused: in the histories the
    driver put later segments below everything, not into it.  Only the addresses' order matters."""

    def __init__(self, top: int = _DEVICE_VA_TOP):
        self.lowest = top
        self.holes: list = []  # sorted, disjoint (start, end)

    def alloc(self, size: int) -> int:
        for i, (start, end) in enumerate(self.holes):
            if end - start >= size:
                if end - start == size:
                    del self.holes[i]
                else:
                    self.holes[i] = (start + size, end)
                return start
        align = min(1 << max(size - 1, 1).bit_length(), _MAX_VA_ALIGN)
        addr = (self.lowest - size) // align * align
        if addr + size < self.lowest:
            self._add_hole(addr + size, self.lowest)
        self.lowest = addr
        return addr

    def _add_hole(self, start: int, end: int) -> None:
        i = bisect_left(self.holes, (start, end))
        if i < len(self.holes) and self.holes[i][0] == end:  # merge with the hole above
            end = self.holes.pop(i)[1]
        if i > 0 and self.holes[i - 1][1] == start:  # and the one below
            start = self.holes.pop(i - 1)[0]
            i -= 1
        self.holes.insert(i, (start, end))


class CachingAllocator:
    """One device, one stream.  `malloc(nbytes)` returns a handle for `free(handle)`."""

    def __init__(self, expandable_segments: bool = False, limit_bytes: int | None = None):
        self.expandable = expandable_segments
        self.limit_bytes = limit_bytes  # allowed_memory_maximum; None: no fraction set
        self.num_alloc_retries = 0
        self.pools = {True: _Pool(True), False: _Pool(False)}
        self.allocated = 0  # allocated_bytes: sum of allocated blocks' sizes
        self.reserved = 0  # reserved_bytes
        self.requested = 0  # requested_bytes: sum of the requested sizes
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.num_device_alloc = 0  # cudaMalloc calls, or page-range mappings (expandable)
        self.segments = 0
        self._next_addr = 1 << 32  # expandable segments' reserved address ranges, increasing
        self._va = _DeviceAddressSpace()  # cudaMalloc'd segments' addresses

    # ------------------------------------------------------------------ public

    def malloc(self, nbytes: int) -> Block:
        # the replay's hot path: round_size, get_free_block's plain case and Pool.erase inlined
        size = kMinBlockSize if nbytes < kMinBlockSize else -(-nbytes // kMinBlockSize) * kMinBlockSize
        small = size <= kSmallSize
        pool = self.pools[small]
        keys = pool.keys
        if self.expandable:
            block = self._get_free_block(pool, size)
        else:
            i = bisect_left(keys, (size, -1))
            block = None
            if i < len(keys):
                k = keys[i]
                block = pool.blocks.pop(k)
                del keys[i]
        if block is None:
            block = self._alloc_block(pool, size) if self.limit_bytes is None else self._alloc_capped(pool, size)
        # should_split
        remaining = block.size - size
        if small or self.expandable:
            split = remaining >= kMinBlockSize
        else:
            split = remaining > kSmallSize
        if split:
            rest = block
            block = Block(rest.addr, size, small, rest.expandable)
            block.prev = prev = rest.prev
            if prev is not None:
                prev.next = block
            block.next = rest
            rest.prev = block
            rest.addr += size
            rest.size -= size
            k = (rest.size, rest.addr)
            insort(keys, k)
            pool.blocks[k] = rest
        block.allocated = True
        block.requested = nbytes
        self.allocated += block.size
        self.requested += nbytes
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        return block

    def free(self, block: Block) -> None:
        assert block.allocated, "double free"
        block.allocated = False
        self.allocated -= block.size
        self.requested -= block.requested
        pool = self.pools[block.small]
        prev, nxt = block.prev, block.next
        if prev is not None and not prev.allocated:
            self._try_merge(block, prev, pool)
        if nxt is not None and not nxt.allocated:
            self._try_merge(block, nxt, pool)
        k = (block.size, block.addr)
        insort(pool.keys, k)
        pool.blocks[k] = block

    def apply(self, ev, live: dict) -> None:
        """One replay event: ("a", id, bytes) allocates into `live`, ("f", id) frees, ("e",) empties the cache."""
        if ev[0] == "a":
            live[ev[1]] = self.malloc(ev[2])
        elif ev[0] == "e":
            self.empty_cache()
        else:
            self.free(live.pop(ev[1]))

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache: every free block that is a whole segment is cudaFree'd.
        Expandable segments (whose free pages torch unmaps) are left mapped here."""
        if self.expandable:
            return
        self._release_whole_segments()

    def release_cached_blocks(self) -> None:
        """What malloc does under the cap before its retry: every cached free segment that is not
        split is cudaFree'd; with expandable segments every free block's whole pages are unmapped."""
        if not self.expandable:
            self._release_whole_segments()
            return
        for pool in self.pools.values():
            for b in [pool.blocks[k] for k in pool.keys if pool.blocks[k].expandable]:
                self._unmap_block(pool, b)

    def _release_whole_segments(self) -> None:
        for pool in self.pools.values():
            for k in list(pool.keys):
                b = pool.blocks[k]
                if b.prev is None and b.next is None:
                    pool.erase(b)
                    self.reserved -= b.size
                    self.segments -= 1

    def reset_peaks(self) -> None:
        self.peak_allocated = self.allocated
        self.peak_reserved = self.reserved

    def state(self, live: dict) -> tuple:
        """Everything the allocator's future decisions depend on, without the handles' ids: every
        block (free, unmapped or live) with its segment neighbours, the totals, where the next
        segments go.  Two equal states fed equal events (up to ids) make equal decisions."""
        blocks = [b for pool in self.pools.values() for b in pool.blocks.values()]
        blocks += [b for pool in self.pools.values() for b in pool.unmapped]
        blocks += live.values()
        cells = sorted((b.addr, b.size, b.allocated, b.mapped, b.small, b.expandable, b.requested,
                        b.prev.addr if b.prev is not None else None, b.next.addr if b.next is not None else None)
                       for b in blocks)
        return (tuple(cells), self.allocated, self.reserved, self.requested, self.segments, self._next_addr,
                self._va.lowest, tuple(self._va.holes),
                tuple(pool.segment_base for pool in self.pools.values()))

    # ------------------------------------------------------------------ internals

    def _get_free_block(self, pool: _Pool, size: int):
        keys, blocks = pool.keys, pool.blocks
        i = bisect_left(keys, (size, -1))
        n = len(keys)
        if i >= n:
            return None
        b = blocks[keys[i]]
        if b.expandable and self.expandable:
            # best fit by the size a block can expand to (its unmapped neighbour included)
            nx = b.next
            size_b = b.size + (nx.size if nx is not None and not nx.mapped else 0)
            j = i + 1
            while j < n:
                nb = blocks[keys[j]]
                nx = nb.next
                size_nb = nb.size + (nx.size if nx is not None and not nx.mapped else 0)
                if size_nb >= size_b:
                    break
                b, size_b, i = nb, size_nb, j
                if not b.expandable:
                    break
                j += 1
        del keys[i]  # Pool.erase, at the index already found
        del blocks[(b.size, b.addr)]
        return b

    def _alloc_capped(self, pool: _Pool, size: int) -> Block:
        """malloc's path when no cached block fits, under the cap: alloc_block, else
        release_available_cached_blocks (frees nothing: max_split_size is unlimited by default),
        else release_cached_blocks and alloc_block again (counted as a retry), else OOM."""
        if self.reserved + get_allocation_size(size) <= self.limit_bytes:
            return self._alloc_block(pool, size)
        self.release_cached_blocks()
        self.num_alloc_retries += 1
        if self.reserved + get_allocation_size(size) <= self.limit_bytes:
            return self._alloc_block(pool, size)
        raise OutOfMemory(f"{size} B requested with {self.allocated} B allocated, {self.reserved} B reserved "
                          f"and a cap of {self.limit_bytes} B")

    def _alloc_block(self, pool: _Pool, size: int) -> Block:
        if self.expandable:
            return self._try_allocate_expandable_block(pool, size)
        alloc_size = get_allocation_size(size)
        addr = self._va.alloc(alloc_size)  # cudaMalloc: where the driver puts the new segment
        self.reserved += alloc_size
        self.num_device_alloc += 1
        self.segments += 1
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved
        return Block(addr, alloc_size, pool.small)

    def _try_merge(self, dst: Block, src, pool: _Pool) -> int:
        if src is None or src.allocated or src.mapped != dst.mapped:
            return 0
        if dst.prev is src:
            dst.addr = src.addr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        if src.mapped:
            pool.erase(src)
        else:
            pool.unmapped.remove(src)
            if dst not in pool.unmapped:
                pool.unmapped.append(dst)
        dst.size += src.size
        return src.size

    # expandable segments -------------------------------------------------

    def _page(self, pool: _Pool) -> int:
        return kSmallBuffer if pool.small else kLargeBuffer

    def _find_expandable_block(self, pool: _Pool, size: int) -> Block:
        """The lowest unmapped block (with the free block just before it) whose run of free and
        unmapped blocks holds `size`; else a new segment, all of its address space unmapped."""
        for c in sorted(pool.unmapped, key=lambda b: b.addr):
            if c.prev is not None and not c.prev.allocated:
                c = c.prev
            room, b = 0, c
            while room < size and b is not None and not b.allocated:
                room += b.size
                b = b.next
            if room >= size:
                return c
        addr = self._next_addr
        self._next_addr += _VA_SIZE
        c = Block(addr, _VA_SIZE, pool.small, expandable=True, mapped=False)
        pool.unmapped.append(c)
        pool.segment_base = addr
        self.segments += 1
        return c

    def _unmap_block(self, pool: _Pool, b: Block) -> None:
        """unmap_block: the pages wholly inside free block `b` are unmapped; the mapped bits
        before and after them stay as free blocks."""
        page, base = self._page(pool), pool.segment_base
        begin = base + -(-(b.addr - base) // page) * page
        end = base + (b.addr + b.size - base) // page * page
        if begin >= end:
            return
        pool.erase(b)
        if begin > b.addr:  # prev? -> before -> b
            before = Block(b.addr, begin - b.addr, pool.small, expandable=True)
            before.prev, before.next = b.prev, b
            if b.prev is not None:
                b.prev.next = before
            b.prev = before
            pool.insert(before)
        if end < b.addr + b.size:  # b -> after -> next?
            after = Block(end, b.addr + b.size - end, pool.small, expandable=True)
            after.prev, after.next = b, b.next
            if b.next is not None:
                b.next.prev = after
            b.next = after
            pool.insert(after)
        b.addr, b.size, b.mapped = begin, end - begin, False
        pool.unmapped.append(b)
        self._try_merge(b, b.prev, pool)
        self._try_merge(b, b.next, pool)
        self.reserved -= end - begin

    def _map_block(self, pool: _Pool, to_map: Block, size: int) -> None:
        page = self._page(pool)
        mapped = min(to_map.size, page * ((size + page - 1) // page))
        to_map.mapped = True
        pool.unmapped.remove(to_map)
        if mapped < to_map.size:
            rest = Block(to_map.addr + mapped, to_map.size - mapped, pool.small, expandable=True, mapped=False)
            rest.prev = to_map
            rest.next = to_map.next
            if rest.next is not None:
                rest.next.prev = rest
            to_map.next = rest
            to_map.size = mapped
            pool.unmapped.append(rest)
        self._try_merge(to_map, to_map.prev, pool)
        self._try_merge(to_map, to_map.next, pool)
        pool.insert(to_map)
        self.reserved += mapped
        self.num_device_alloc += 1
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved

    def _try_allocate_expandable_block(self, pool: _Pool, size: int) -> Block:
        c = self._find_expandable_block(pool, size)
        if not c.mapped:
            self._map_block(pool, c, min(c.size, size))
        while c.size < size:
            nxt = c.next
            self._map_block(pool, nxt, min(size - c.size, nxt.size))
            c = nxt
        pool.erase(c)
        return c


def empty_cache_at(events: list, marks: dict) -> int:
    """Index of a replay stream's first ("e",) event: the Trainer's empty_cache after the load (else
    the `after_load` mark)."""
    return next((i for i, ev in enumerate(events) if ev[0] == "e"), marks.get("after_load", 0))


def simulate(events, expandable_segments: bool = False, limit_bytes: int | None = None,
             initial_allocated: int = 0) -> dict:
    """events: ("a", id, nbytes) / ("f", id) / ("e",) (empty_cache) tuples.  Returns the peaks, the
    segment count and, under a cap (`limit_bytes`, the allocator's allowed maximum), whether and
    at which event it ran out of memory and how many times malloc released its cache and retried.
    `initial_allocated`: bytes already allocated when the events start (left by earlier work)."""
    return run(CachingAllocator(expandable_segments, limit_bytes), events, initial_allocated)


def run(a, events, initial_allocated: int = 0) -> dict:
    """`events` through the allocator model `a` (a CachingAllocator or a subclass): `simulate`'s result."""
    live = {}
    oom_at = None
    i = -1  # -1: the initial allocation itself did not fit
    try:
        if initial_allocated:
            a.malloc(initial_allocated)
        for i, ev in enumerate(events):
            a.apply(ev, live)
    except OutOfMemory:
        oom_at = i
    return {"peak_allocated": a.peak_allocated, "peak_reserved": a.peak_reserved,
            "num_device_alloc": a.num_device_alloc, "allocated": a.allocated, "reserved": a.reserved,
            "oom": oom_at is not None, "oom_at": oom_at, "num_alloc_retries": a.num_alloc_retries}
