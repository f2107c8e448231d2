"""The global-memory buffers of torch's CUDA reductions, in bytes.

A TensorIterator reduction (sum, mean, norm, amax, ...) runs `gpu_reduce_kernel`
(aten/src/ATen/native/cuda/Reduce.cuh).  `setReduceConfig` picks the launch; when it splits one
output's inputs across thread blocks (`config.should_global_reduce()`), the kernel launch takes two
blocks from the caching allocator and frees them when the launch returns:

    buffer = allocator.allocate(config.global_memory_size());   // staging, one arg_t per CTA
    semaphores = allocator.allocate(config.semaphore_size());   // one int per grid column

The staging buffer is small for a full reduction (the block reduces along x first), but for a
reduction over a non-contiguous dimension with many outputs (Adafactor's column mean
`update.mean(dim=-2)`) every lane keeps its own partials: element_size x outputs x ctas_per_output
x block.x x output_vec_size, 128 MiB for a 8192 x 2048 fp32 gradient on an H100.

`reduce_buffers` reproduces TensorIterator's reduction layout (reduced dimensions first, each group
by stride, adjacent dimensions coalesced) and `setReduceConfig`'s arithmetic for CUDA (not ROCm),
as in torch 2.11.  No torch import: shapes and strides in, bytes out.
"""

from __future__ import annotations

from dataclasses import dataclass

H100_SMS = 132  # H100 SXM5 multiProcessorCount
MAX_THREADS_PER_SM = 2048  # maxThreadsPerMultiProcessor, sm_80 and sm_90
WARP = 32
MAX_NUM_THREADS = 512  # mnt_wrapper<T>::MAX_NUM_THREADS (256 only for complex<double>)
MIN_VALUES_PER_THREAD = 16
MAX_VALUES_PER_THREAD = 256
INT32_MAX = 2**31 - 1  # TensorIterator::can_use_32bit_indexing: byte offsets must fit


def _div_up(a: int, b: int) -> int:
    return -(-a // b)


def _last_pow2(n: int) -> int:
    """Reduce.cuh's last_pow2: the largest power of two <= n (at least 1)."""
    return max(1, 1 << (max(n, 1).bit_length() - 1))


@dataclass
class ReduceConfig:
    """The fields of Reduce.cuh's ReduceConfig that decide the global buffers."""

    element_size_bytes: int
    num_outputs: int
    num_inputs: int
    step_input: int = 1
    step_output: int = 1
    ctas_per_output: int = 1
    block_width: int = 1
    block_height: int = 1
    output_vec_size: int = 1
    vectorize_input: bool = False
    block_x_reduce: bool = False  # input_mult[BLOCK_X] != 0
    block_y_reduce: bool = False  # input_mult[BLOCK_Y] != 0
    global_reduce: bool = False  # input_mult[CTA] != 0

    @property
    def num_threads(self) -> int:
        return self.block_width * self.block_height

    def values_per_thread(self) -> int:
        return _div_up(self.num_inputs, self.step_input)

    def grid_x(self) -> int:
        return _div_up(self.num_outputs // self.output_vec_size, self.step_output)

    def set_block_dimension(self, dim0: int, dim1: int) -> None:
        max_num_threads = MAX_NUM_THREADS // self.output_vec_size
        dim0_pow2 = _last_pow2(dim0) if dim0 < max_num_threads else max_num_threads
        dim1_pow2 = _last_pow2(dim1) if dim1 < max_num_threads else max_num_threads
        self.block_width = min(dim0_pow2, WARP)
        self.block_height = min(dim1_pow2, max_num_threads // self.block_width)
        self.block_width = min(dim0_pow2, max_num_threads // self.block_height)

    def split_input(self, parallelism: int) -> int:
        step = self.step_input
        self.step_input *= parallelism
        return step

    def split_output(self, parallelism: int) -> int:
        step = self.step_output
        self.step_output *= parallelism
        return step

    def global_memory_size(self) -> int:
        if not self.global_reduce:
            return 0
        size = self.element_size_bytes * self.num_outputs * self.ctas_per_output
        if not self.block_x_reduce:
            size *= self.block_width * self.output_vec_size
        return size

    def semaphore_size(self) -> int:
        return 4 * self.grid_x() if self.global_reduce else 0


def reduction_layout(shape, strides, reduce_dims) -> tuple[list, list, int]:
    """TensorIterator's view of a reduction of a dense input: (shape, input strides in elements,
    number of reduced dimensions), reduced dimensions first and fastest first within each group,
    size-1 dimensions dropped and adjacent dimensions coalesced."""
    reduce_dims = {d % len(shape) for d in reduce_dims} if shape else set()
    dims = [d for d in range(len(shape)) if shape[d] != 1]
    dims.sort(key=lambda d: (d not in reduce_dims, strides[d]))
    out_shape, out_strides, reduced = [], [], []
    for d in dims:
        r = d in reduce_dims
        if out_shape and reduced[-1] == r and out_strides[-1] * out_shape[-1] == strides[d]:
            out_shape[-1] *= shape[d]
            continue
        out_shape.append(shape[d])
        out_strides.append(strides[d])
        reduced.append(r)
    return out_shape, out_strides, sum(reduced)


def _output_vec_size(shape, strides, num_reduce_dims: int) -> int:
    """get_output_vec_size: 4, halved until it divides the output extent and the other strides
    (the data pointer is assumed aligned, as the caching allocator's 512-byte blocks are)."""
    vec = 4

    def fit(n):
        nonlocal vec
        while n % vec:
            vec //= 2

    fit(shape[num_reduce_dims])
    for j, s in enumerate(strides):
        if j != num_reduce_dims:
            fit(s)
    return vec


def set_reduce_config(shape, strides, num_reduce_dims: int, element_size: int, arg_size: int,
                      vt0: int = 4, input_vec_size: int = 4, num_sms: int = H100_SMS) -> ReduceConfig:
    """setReduceConfig<arg_t, scalar_t, vt0, input_vec_size> for a TensorIterator of `shape` whose
    input has `strides` (elements; `element_size` bytes each) and whose first `num_reduce_dims`
    dimensions are reduced; `arg_size` is sizeof(arg_t), the accumulator."""
    ndim = len(shape)
    numel = 1
    for n in shape:
        numel *= n
    num_outputs = 1
    for n in shape[num_reduce_dims:]:
        num_outputs *= n
    inputs_per_output = numel // num_outputs
    c = ReduceConfig(arg_size, num_outputs, inputs_per_output)
    if ndim > 0:
        fastest = num_reduce_dims == ndim or strides[0] < strides[num_reduce_dims]
        if fastest:
            dim0, dim1 = inputs_per_output, num_outputs
            fastest_stride = strides[0]
        else:
            dim0, dim1 = num_outputs, inputs_per_output
            fastest_stride = strides[num_reduce_dims]
    else:
        fastest, fastest_stride, dim0, dim1 = True, 1, 1, 1
    if fastest_stride == 1:
        if fastest and dim0 > 128 and num_reduce_dims == 1 and vt0 >= input_vec_size:
            c.vectorize_input = True  # "vectorize along input"
            dim0 //= input_vec_size
        elif not fastest:
            c.output_vec_size = _output_vec_size(shape, strides, num_reduce_dims)  # "along output"
            dim0 //= c.output_vec_size
    c.set_block_dimension(dim0, dim1)
    if ndim == 0 or fastest:
        c.block_x_reduce = c.split_input(c.block_width) != 0
    else:
        c.split_output(c.block_width)
    warp_split_threshold = min(c.block_height * 16, MAX_VALUES_PER_THREAD)
    if c.values_per_thread() >= warp_split_threshold:
        c.block_y_reduce = c.split_input(c.block_height) != 0
    else:
        c.split_output(c.block_height)
    blocks_per_sm = MAX_THREADS_PER_SM // c.num_threads
    target_grid_size = num_sms * blocks_per_sm
    grid = c.grid_x()
    if c.block_y_reduce and c.values_per_thread() >= MAX_VALUES_PER_THREAD and grid <= target_grid_size:
        ctas1 = _div_up(target_grid_size, grid)
        ctas2 = _div_up(c.values_per_thread(), MIN_VALUES_PER_THREAD)
        ctas3 = _div_up(c.values_per_thread(), MAX_VALUES_PER_THREAD)
        c.ctas_per_output = max(min(ctas1, ctas2), ctas3)
        if c.ctas_per_output > 1:
            c.global_reduce = c.split_input(c.ctas_per_output) != 0
    return c


def _split_32bit(shape, strides, element_size: int):
    """TensorIterator::with_32bit_indexing: halve the dimension with the largest byte extent until
    every sub-iteration's offsets fit in int32; yields the sub-shapes in launch order."""
    extent = sum((n - 1) * s for n, s in zip(shape, strides)) * element_size + 1
    if extent <= INT32_MAX:
        yield list(shape)
        return
    d = max(range(len(shape)), key=lambda i: (shape[i] - 1) * strides[i])
    first, second = list(shape), list(shape)
    first[d] = shape[d] // 2
    second[d] = shape[d] - first[d]
    yield from _split_32bit(first, strides, element_size)
    yield from _split_32bit(second, strides, element_size)


def reduce_buffers(shape, strides, reduce_dims, element_size: int, arg_size: int, vt0: int = 4,
                   input_vec_size: int = 4, num_sms: int = H100_SMS) -> list[tuple[int, int]]:
    """(staging bytes, semaphore bytes) of each kernel launch of one reduction that reduces
    global memory; launches that don't are left out.  `shape`/`strides` (elements) describe the
    input; `reduce_dims` the reduced dimensions (all of them for a full reduction)."""
    it_shape, it_strides, nred = reduction_layout(shape, strides, reduce_dims)
    out = []
    for sub in _split_32bit(it_shape, it_strides, element_size):
        c = set_reduce_config(sub, it_strides, nred, element_size, arg_size, vt0, input_vec_size, num_sms)
        if c.global_reduce:
            out.append((c.global_memory_size(), c.semaphore_size()))
    return out
