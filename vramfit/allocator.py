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
Not modelled: several streams (record_stream), OOM retries (release of cached blocks when
cudaMalloc fails), memory fractions, garbage collection threshold, CUDA graphs' private pools.
Reserved memory never shrinks here, as in a training loop that never calls empty_cache.
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
        self.tail = None  # the unmapped block of this pool's expandable segment

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


class CachingAllocator:
    """One device, one stream.  `malloc(nbytes)` returns a handle for `free(handle)`."""

    def __init__(self, expandable_segments: bool = False):
        self.expandable = expandable_segments
        self.pools = {True: _Pool(True), False: _Pool(False)}
        self.allocated = 0  # allocated_bytes: sum of allocated blocks' sizes
        self.reserved = 0  # reserved_bytes
        self.requested = 0  # requested_bytes: sum of the requested sizes
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.num_device_alloc = 0  # cudaMalloc calls, or page-range mappings (expandable)
        self.segments = 0
        self._next_addr = 1 << 32

    # ------------------------------------------------------------------ public

    def malloc(self, nbytes: int) -> Block:
        size = round_size(nbytes)
        small = size <= kSmallSize
        pool = self.pools[small]
        block = self._get_free_block(pool, size)
        if block is None:
            block = self._alloc_block(pool, size)
        # should_split
        remaining = block.size - size
        if small or self.expandable:
            split = remaining >= kMinBlockSize
        else:
            split = remaining > kSmallSize
        if split:
            rest = block
            block = Block(rest.addr, size, small, rest.expandable)
            block.prev = rest.prev
            if block.prev is not None:
                block.prev.next = block
            block.next = rest
            rest.prev = block
            rest.addr += size
            rest.size -= size
            pool.insert(rest)
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
        for cand in (block.prev, block.next):
            self._try_merge(block, cand, pool)
        pool.insert(block)

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache: every free block that is a whole segment is cudaFree'd.
        Expandable segments (whose free pages torch unmaps) are left mapped here."""
        if self.expandable:
            return
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

    # ------------------------------------------------------------------ internals

    def _get_free_block(self, pool: _Pool, size: int):
        i = pool.lower_bound(size)
        if i >= len(pool.keys):
            return None
        b = pool.blocks[pool.keys[i]]
        if b.expandable and self.expandable:
            # best fit by the size a block can expand to (its unmapped neighbour included)
            def exp_size(x):
                return x.size + (x.next.size if x.next is not None and not x.next.mapped else 0)
            j = i + 1
            while b.expandable and j < len(pool.keys):
                nb = pool.blocks[pool.keys[j]]
                if exp_size(nb) < exp_size(b):
                    b = nb
                    j += 1
                else:
                    break
        pool.erase(b)
        return b

    def _alloc_block(self, pool: _Pool, size: int) -> Block:
        if self.expandable:
            return self._try_allocate_expandable_block(pool, size)
        alloc_size = get_allocation_size(size)
        addr = self._next_addr
        self._next_addr += alloc_size + kLargeBuffer  # cudaMalloc: fresh, increasing addresses
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
            pool.tail = dst if pool.tail is src else pool.tail
        dst.size += src.size
        return src.size

    # expandable segments -------------------------------------------------

    def _page(self, pool: _Pool) -> int:
        return kSmallBuffer if pool.small else kLargeBuffer

    def _find_expandable_block(self, pool: _Pool, size: int) -> Block:
        c = pool.tail
        if c is None:  # a new segment: all of its address space unmapped
            addr = self._next_addr
            self._next_addr += _VA_SIZE
            c = Block(addr, _VA_SIZE, pool.small, expandable=True, mapped=False)
            pool.tail = c
            self.segments += 1
            return c
        if c.prev is not None and not c.prev.allocated:
            c = c.prev
        return c

    def _map_block(self, pool: _Pool, to_map: Block, size: int) -> None:
        page = self._page(pool)
        mapped = min(to_map.size, page * ((size + page - 1) // page))
        to_map.mapped = True
        if mapped < to_map.size:
            rest = Block(to_map.addr + mapped, to_map.size - mapped, pool.small, expandable=True, mapped=False)
            rest.prev = to_map
            rest.next = to_map.next
            if rest.next is not None:
                rest.next.prev = rest
            to_map.next = rest
            to_map.size = mapped
            pool.tail = rest
        else:
            pool.tail = None
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


def simulate(events, expandable_segments: bool = False) -> dict:
    """events: ("a", id, nbytes) / ("f", id) / ("e",) (empty_cache) tuples.  Returns the peaks and the segment count."""
    a = CachingAllocator(expandable_segments)
    live = {}
    for ev in events:
        if ev[0] == "a":
            live[ev[1]] = a.malloc(ev[2])
        elif ev[0] == "e":
            a.empty_cache()
        else:
            a.free(live.pop(ev[1]))
    return {"peak_allocated": a.peak_allocated, "peak_reserved": a.peak_reserved,
            "num_device_alloc": a.num_device_alloc, "allocated": a.allocated, "reserved": a.reserved}
