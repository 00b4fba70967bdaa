"""A CPU emulation of the CUDA C kernels of kernels/cuda/*.cu, with REAL thread blocks.

Each .cu file is compiled by g++ as plain C++ with a small header (EMU_HEADER below) that maps the
CUDA C the kernels use onto C++:

    __global__, __device__, __forceinline__     nothing / inline
    threadIdx, blockIdx, blockDim, gridDim      globals, set by the emulator for the running thread
    __shared__                                  static: one copy, shared by the threads of the block
                                                that runs (blocks run one after the other)
    __syncthreads()                             a real barrier (below)
    float2/float4, double2/double4, int2/int4   structs with .x .y .z .w, make_float4(...), ...
    __ldg(p)                                    *p

A launch ``f(grid, block, args)`` runs every block of the grid, one after another, and inside a block
every one of its blockDim.x * blockDim.y * blockDim.z threads as a coroutine with a stack of its own
(on x86-64 a dozen instructions of assembly switch stacks; elsewhere ucontext). The threads of a block take turns in a fixed order: thread 0 runs until it reaches
__syncthreads() (or returns), then thread 1, ..., then the next phase. This is one legal schedule of
the GPU's, and the harshest one for a missing barrier: a thread that reads shared memory other threads
have not written yet (no barrier in between) reads stale values, and one that overwrites a tile
other threads still need (no barrier before the next load) overwrites it before they read it, every
time, so such a race gives a wrong result deterministically instead of once in a while.
``order='reverse'`` runs the threads of each phase from the last to the first (the tests use both).

A barrier that only some threads of a block reach (the others have returned) is an error in CUDA
(__syncthreads in divergent code); the emulator stops such a launch with an error naming the kernel.

Each launch is also checked against the kernel's C signature (argument count, pointer dtypes, exact
scalar types), which is what a RawKernel launch on the GPU needs.

mode='one-thread' (the emulation the project began with) launches every kernel as one block of one
thread, whatever grid and block the caller asked for. That is correct only for grid-stride kernels,
and it is faster; the tests use real blocks (mode='blocks') by default.
"""
import atexit
import ctypes
import functools
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np

from unet_np.backends import cupy_backend as cb

EMU_HEADER = r"""
// Maps the CUDA C used in kernels/cuda/*.cu onto plain C++ (see tests/backends/cuda_emulation.py).
#include <math.h>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <functional>
#include <vector>
#include <ucontext.h>
struct emu_dim3 { unsigned int x, y, z; };
static emu_dim3 threadIdx = {0u, 0u, 0u}, blockIdx = {0u, 0u, 0u};
static emu_dim3 blockDim = {1u, 1u, 1u}, gridDim = {1u, 1u, 1u};
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __ldg(p) (*(p))
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(16) double4 { double x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
static inline float2 make_float2(float x, float y) { return {x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
static inline double2 make_double2(double x, double y) { return {x, y}; }
static inline double4 make_double4(double x, double y, double z, double w) { return {x, y, z, w}; }
static inline int2 make_int2(int x, int y) { return {x, y}; }
static inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }

// -- the threads of a block, as coroutines --------------------------------------------------------
// A thread is a stack of its own and a saved stack pointer; switching threads saves the callee-saved
// registers on the running stack and pops them from the other one (x86-64: a few instructions; other
// machines: ucontext, whose swapcontext costs a system call per switch).
namespace emu {
enum { READY = 0, AT_BARRIER = 1, DONE = 2 };
static std::vector<char*> stacks;
static std::vector<int> state;
static int current = 0;
static const std::function<void()>* body = nullptr;
static const size_t STACK = 256 * 1024;
static int reverse_order = 0;
static int error = 0;                 // 1: a barrier reached by only part of the block
#if defined(__x86_64__)
extern "C" void emu_switch_stack(void** save_sp, void* next_sp);
asm(".text\n.globl emu_switch_stack\n.hidden emu_switch_stack\n.type emu_switch_stack,@function\n"
    "emu_switch_stack:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n  ret\n");
static void* scheduler_sp;
static std::vector<void*> sp;
static void to_scheduler() { emu_switch_stack(&sp[current], scheduler_sp); }
static void to_thread(unsigned t) { emu_switch_stack(&scheduler_sp, sp[t]); }
static void entry() {
    (*body)();
    state[current] = DONE;
    to_scheduler();                   // never resumed
}
static void start(unsigned t) {       // a fresh stack whose first switch 'returns' into entry()
    sp.resize(stacks.size());
    char* top = (char*)(((unsigned long)(stacks[t] + STACK)) & ~15ul);
    void** s = (void**)(top - 16);
    s[0] = (void*)&entry;
    for (int r = 1; r <= 6; ++r) s[-r] = nullptr;
    sp[t] = (void*)(s - 6);
}
#else
static ucontext_t scheduler;
static std::vector<ucontext_t> ctx;
static void to_scheduler() { swapcontext(&ctx[current], &scheduler); }
static void to_thread(unsigned t) { swapcontext(&scheduler, &ctx[t]); }
static void entry() {
    (*body)();
    state[current] = DONE;
    to_scheduler();
}
static void start(unsigned t) {
    ctx.resize(stacks.size());
    getcontext(&ctx[t]);
    ctx[t].uc_stack.ss_sp = stacks[t];
    ctx[t].uc_stack.ss_size = STACK;
    ctx[t].uc_link = nullptr;
    makecontext(&ctx[t], entry, 0);
}
#endif
}  // namespace emu

static void __syncthreads() {
    emu::state[emu::current] = emu::AT_BARRIER;
    emu::to_scheduler();
}

static void emu_run(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                    const std::function<void()>& f) {
    const unsigned nt = bx * by * bz;
    while (emu::stacks.size() < nt) emu::stacks.push_back((char*)std::malloc(emu::STACK));
    emu::state.assign(nt, emu::READY);
    emu::body = &f;
    emu::error = 0;
    gridDim = {gx, gy, gz};
    blockDim = {bx, by, bz};
    for (unsigned z = 0; z < gz; ++z)
    for (unsigned y = 0; y < gy; ++y)
    for (unsigned x = 0; x < gx; ++x) {
        blockIdx = {x, y, z};
        for (unsigned t = 0; t < nt; ++t) {
            emu::start(t);
            emu::state[t] = emu::READY;
        }
        for (;;) {                                     // one phase: every thread to its next barrier
            for (unsigned k = 0; k < nt; ++k) {
                const unsigned t = emu::reverse_order ? nt - 1 - k : k;
                if (emu::state[t] != emu::READY) continue;
                emu::current = (int)t;
                threadIdx = {t % bx, (t / bx) % by, t / (bx * by)};
                emu::to_thread(t);
            }
            unsigned waiting = 0;
            for (unsigned t = 0; t < nt; ++t) waiting += emu::state[t] == emu::AT_BARRIER;
            if (waiting == 0) break;                   // every thread returned
            if (waiting != nt) {                       // some returned, some wait: divergent barrier
                emu::error = 1;
                return;
            }
            for (unsigned t = 0; t < nt; ++t) emu::state[t] = emu::READY;
        }
    }
}
extern "C" int emu_error() { return emu::error; }
extern "C" void emu_set_order(int reverse) { emu::reverse_order = reverse; }
"""

_PTR = {"float": np.float32, "double": np.float64, "int": np.int32, "long long": np.int64}
_SCALAR = {"float": (np.float32, ctypes.c_float), "double": (np.float64, ctypes.c_double),
           "int": (np.int32, ctypes.c_int), "long long": (np.int64, ctypes.c_longlong)}
_UNS = ctypes.c_uint


def _parse_param(text):
    """'const float* __restrict__ x' -> ('float', True, 'x')."""
    pointer = "*" in text
    words = [w for w in re.split(r"[\s*]+", text) if w and w not in ("const", "__restrict__")]
    base = " ".join(words[:-1])
    if base not in _SCALAR:
        raise AssertionError(f"unexpected kernel parameter type in {text!r}")
    return base, pointer, words[-1]


def _gxx():
    return shutil.which("g++")


@functools.lru_cache(maxsize=None)
def emu_library(family, defines=(), source=None):
    """(ctypes library, {kernel name: [(base type, is pointer, name), ...]}) for kernels/cuda/<family>.cu
    (or the CUDA C text ``source``, named ``family``) built with the macro definitions ``defines``
    ('NAME=VALUE', ...); every kernel gets a launcher emu_launch__<name>(grid x, y, z, block x, y, z,
    the kernel's arguments)."""
    gxx = _gxx()
    if gxx is None:
        raise RuntimeError("g++ is not installed: the CPU emulation of the CUDA kernels cannot be built")
    tmp = tempfile.mkdtemp(prefix=f"unet_np_emu_{family}_")
    atexit.register(shutil.rmtree, tmp, True)
    dflags = [f"-D{d}" for d in defines]
    src = os.path.join(tmp, f"{family}.cu")
    with open(src, "w") as f:
        f.write(cb.kernel_source(family) if source is None else source)
    pre = subprocess.run([gxx, "-E", "-P", "-x", "c++", *dflags, "-D__global__=", "-D__device__=",
                          "-D__forceinline__=inline", "-D__shared__=static", "-D__launch_bounds__(...)=", src],
                         check=True, capture_output=True, text=True).stdout
    sigs = {}
    for name, params in re.findall(r'extern\s+"C"\s+void\s+(\w+)\s*\(([^)]*)\)', pre):
        sigs[name] = [_parse_param(p) for p in params.split(",")]
    wrappers = []
    for name, params in sigs.items():
        decl = ", ".join(f"{b}{'*' if p else ''} {n}" for b, p, n in params)
        call = ", ".join(n for _, _, n in params)
        wrappers.append(
            f'extern "C" void emu_launch__{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, '
            f'unsigned by, unsigned bz, {decl}) {{\n'
            f'    const std::function<void()> f = [&]() {{ {name}({call}); }};\n'
            f'    emu_run(gx, gy, gz, bx, by, bz, f);\n}}\n')
    full = os.path.join(tmp, f"{family}_emu.cpp")
    with open(full, "w") as f:
        f.write(f'#include "{src}"\n')
        f.write("\n".join(wrappers))
    header = os.path.join(tmp, "emu.h")
    with open(header, "w") as f:
        f.write(EMU_HEADER)
    lib = os.path.join(tmp, f"lib{family}.so")
    proc = subprocess.run([gxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-x", "c++", "-Wno-unknown-pragmas",
                           *dflags, "-include", header, full, "-o", lib], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"g++ could not build the emulation of {family}.cu:\n{proc.stderr[-4000:]}")
    return ctypes.CDLL(lib), sigs


def _triple(v):
    v = tuple(int(a) for a in (v if isinstance(v, (tuple, list)) else (v,)))
    return (v + (1, 1, 1))[:3]


def emu_function(family, name, defines=(), mode="blocks", order="forward", source=None):
    """A launcher ``f(grid, block, args)`` of kernel ``name`` of ``family``, as cupy.RawKernel's.
    mode: 'blocks' (the real grid and blocks) or 'one-thread'; order: 'forward' or 'reverse' (the
    order in which the threads of a block take turns between barriers); source: CUDA C text to build
    instead of kernels/cuda/<family>.cu."""
    lib, sigs = emu_library(family, tuple(defines), source)
    if name not in sigs:
        raise AssertionError(f"{family}.cu has no kernel {name!r}")
    params = sigs[name]
    fn = lib[f"emu_launch__{name}"]
    fn.restype = None
    if mode not in ("blocks", "one-thread") or order not in ("forward", "reverse"):
        raise ValueError(f"emu_function: mode {mode!r} / order {order!r}")

    def launch(grid, block, args):
        args = tuple(args)
        assert len(args) == len(params), f"{name}: {len(args)} arguments, the kernel takes {len(params)}"
        g, b = ((1, 1, 1), (1, 1, 1)) if mode == "one-thread" else (_triple(grid), _triple(block))
        assert all(v >= 1 for v in g + b), f"{name}: empty launch grid {g} block {b}"
        assert b[0] * b[1] * b[2] <= 1024, f"{name}: {b} is more than 1024 threads per block"
        cargs, types = [_UNS(v) for v in g + b], [_UNS] * 6
        for k, (a, (base, pointer, _)) in enumerate(zip(args, params)):
            if pointer:
                assert isinstance(a, np.ndarray), f"{name} argument {k}: expected an array, got {type(a)}"
                assert a.dtype == np.dtype(_PTR[base]), \
                    f"{name} argument {k}: a {base}* needs dtype {np.dtype(_PTR[base])}, got {a.dtype}"
                assert a.flags.c_contiguous, f"{name} argument {k}: the array is not C-contiguous"
                cargs.append(ctypes.c_void_p(a.ctypes.data))
                types.append(ctypes.c_void_p)
            else:
                np_type, c_type = _SCALAR[base]
                assert type(a) is np_type, \
                    f"{name} argument {k}: a {base} needs a {np_type.__name__} scalar, got {type(a).__name__}"
                cargs.append(c_type(a.item()))
                types.append(c_type)
        fn.argtypes = types
        lib.emu_set_order(1 if order == "reverse" else 0)
        fn(*cargs)
        if lib.emu_error():
            raise AssertionError(f"{name}: __syncthreads() reached by only part of a block (grid {g}, "
                                 f"block {b}): a barrier in divergent code")

    return launch


def emulated_kernels(xp=np, mode="blocks", order="forward", defines=None):
    """cupy_backend.CudaKernels over the emulation. defines: {family: ('NAME=VALUE', ...)}."""
    defines = defines or {}
    return cb.CudaKernels(xp, lambda family, name: emu_function(family, name, defines.get(family, ()),
                                                                mode=mode, order=order))
