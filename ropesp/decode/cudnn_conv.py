"""Convolutions through cuDNN's graph API (the optional `nvidia-cudnn-frontend`, module `cudnn`) for the
fast Wan VAE decoder: the bias added in the convolution's epilogue, and of the plans cuDNN builds for a
shape the fastest, timed once (against PyTorch's convolution, which stays where it is faster). PyTorch's
own cuDNN call (cudnn.benchmark) chooses among fewer kernels and adds the bias in a pass of its own: in
the 480p decoder on an H100 the graph's best plan took 0.66 of PyTorch's time for the full-size
96-channel convolutions and 0.51-1.0 for the others; PyTorch's stayed for conv_out (bench/RESULTS.md
twenty-fourth session).

Only half-precision convolutions (bf16, fp16) on CUDA go through a graph; fp32, the CPU, and any shape
cuDNN's graph refuses stay PyTorch's convolution (the same function).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

MAX_PLANS = 64
"""Plans built and timed per shape, in cuDNN's heuristic order: every plan cuDNN offers at the decoder's
shapes (28-35). Building costs little (16 plans in ~5 ms per shape on an H100 with cuDNN 9.19), and
the first 16 missed the best: at the full-size 96-channel convolution the best of them took 2.12 ms in
the decoder, no faster than PyTorch's 2.11; of all of them plan 20 took 1.38 (the whole 480p decoder 1.14x
PyTorch's convolutions with every plan, 1.045x with 16; bench/RESULTS.md twenty-third and twenty-fourth
sessions)."""
SLOW_PLAN = 4.0
SLOW_PLAN_MARGIN_MS = 2.0
"""A plan whose first call takes more than SLOW_PLAN x the best time so far (PyTorch's included) +
SLOW_PLAN_MARGIN_MS is dropped after that call: at every decoder shape cuDNN offers one or two plans
20-1000x slower than the best (5.6 s a call at 720p), and timing them four times made choosing take 43 s
of a 480p decoder's warm-up and 106 s at 720p (H100, bench/RESULTS.md twenty-fourth session). The
margin covers a good plan's first-call setup."""
BUILD_S = 3.0
"""Seconds of plan building per shape, after which no further plan is built (the first always is): a
build may compile a kernel (~0.8 s a plan in an earlier probe), and the decoder has ~20 shapes."""


def available() -> bool:
    """Whether cuDNN's graph API (nvidia-cudnn-frontend) is installed."""
    return importlib.util.find_spec("cudnn") is not None


def torch_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """PyTorch's convolution: x [N, C, (T,) H, W], unpadded, stride 1."""
    return (F.conv3d if x.dim() == 5 else F.conv2d)(x, weight, bias)


def channels_last_empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialized [N, C, *spatial] tensor stored channels last."""
    fmt = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def descriptor_stride(t: torch.Tensor) -> tuple[int, ...]:
    """t's strides as cuDNN is told them: a leading dimension of size 1 (one video, one frame) gets the
    packed stride whatever the view's is (a view of the first frames of a longer buffer keeps the
    buffer's; its value never addresses memory), as PyTorch's own cuDNN descriptors do."""
    stride = list(t.stride())
    if t.dim() > 1 and t.shape[0] == 1:
        stride[0] = max(s * n for s, n in zip(stride[1:], t.shape[1:]))
    return tuple(stride)


def as_described(t: torch.Tensor) -> torch.Tensor:
    """t as a view with descriptor_stride (the same memory)."""
    stride = descriptor_stride(t)
    return t if stride == t.stride() else t.as_strided(t.shape, stride, t.storage_offset())


@dataclass
class _Plan:
    graph: object
    tensors: tuple
    """The graph's (x, weight, bias or None, out) tensor handles: the variant pack's keys."""
    index: int
    workspace: torch.Tensor
    ms: float


@dataclass
class _Built:
    """One signature's outcome, shared by every GraphConvs on its device (with the same keep_faster)."""

    plan: _Plan | None
    refused: str | None
    stats: dict = field(default_factory=dict)
    """build_s, plans (count cuDNN offered), built, ran, ms (best plan), name, torch_ms."""


_HANDLES: dict[int, object] = {}
"""Device index -> the process's cuDNN handle on it."""
_BUILT: dict[tuple, _Built] = {}
"""(device index, keep_faster, signature) -> _Built: the plans built in this process, reused by every
decoder (e.g. one per benchmark configuration). Plans share their workspace: decoders on one device must
not run the same signature at once (the engine core decodes on one thread)."""


class GraphConvs:
    """conv(x, weight, bias) for the fast decoder's fixed shapes: one cuDNN graph per signature (shapes,
    strides, dtype, with or without bias), shared by every convolution of that signature; signatures
    cuDNN cannot run fall back to PyTorch's convolution. Build and time outside CUDA graph capture (the
    decoder's warm-up frame does); replays only execute the chosen plans."""

    def __init__(self, device: torch.device, keep_faster: bool = True) -> None:
        """keep_faster: where PyTorch's convolution times faster than the graph's best plan, keep it
        (False: every signature cuDNN's graph can run goes through it)."""
        if not available():
            raise ModuleNotFoundError(
                "cuDNN graph convolutions need the nvidia-cudnn-frontend package: pip install 'ropesp[cudnn]'"
            )
        import cudnn

        self.cudnn = cudnn
        self.device = torch.device(device)
        self.index = torch.cuda.current_device() if self.device.index is None else self.device.index
        if self.index not in _HANDLES:
            with torch.cuda.device(self.index):
                _HANDLES[self.index] = cudnn.create_handle()
        self.handle = _HANDLES[self.index]
        self.keep_faster = keep_faster
        self.plans: dict[tuple, _Plan | None] = {}
        self.refused: dict[tuple, str] = {}
        """signature -> why it stays PyTorch's convolution (cuDNN's graph refused it, or was slower)."""
        self.stats: dict[tuple, dict] = {}
        """signature -> what choosing its plan found and cost (_Built.stats)."""

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [N, C, (T,) H, W] (already padded; stride 1, no dilation) -> [N, K, (T',) H', W'] channels last."""
        if x.dtype not in (torch.bfloat16, torch.float16) or not x.is_cuda:
            return torch_conv(x, weight, bias)
        x = as_described(x)
        key = (tuple(x.shape), x.stride(), tuple(weight.shape), weight.stride(), bias is not None, x.dtype)
        if key not in self.plans:
            shared = (self.index, self.keep_faster, key)
            if shared not in _BUILT:
                _BUILT[shared] = self._build(key, x, weight, bias)
            built = _BUILT[shared]
            self.plans[key], self.stats[key] = built.plan, built.stats
            if built.refused is not None:
                self.refused[key] = built.refused
        plan = self.plans[key]
        if plan is None:
            return torch_conv(x, weight, bias)
        out = channels_last_empty(_out_shape(x, weight), x)
        self._execute(plan, x, weight, bias, out)
        return out

    def _execute(self, plan: _Plan, x, weight, bias, out) -> None:
        tx, tw, tb, ty = plan.tensors
        pack = {tx: x, tw: weight, ty: out}
        if tb is not None:
            pack[tb] = bias.view(1, -1, *[1] * (x.dim() - 2))
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(x.device).cuda_stream)
        plan.graph.execute_plan_at_index(pack, plan.workspace, plan.index, handle=self.handle)

    def _build(self, key: tuple, x, weight, bias) -> _Built:
        cudnn = self.cudnn
        kind = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[x.dtype]
        out = channels_last_empty(_out_shape(x, weight), x)
        t0 = time.perf_counter()
        stats: dict = {}
        try:
            g = cudnn.pygraph(
                io_data_type=kind,
                intermediate_data_type=cudnn.data_type.FLOAT,
                compute_data_type=cudnn.data_type.FLOAT,
                handle=self.handle,
            )
            tx = g.tensor(name="x", dim=list(x.shape), stride=list(x.stride()), data_type=kind)
            tw = g.tensor(
                name="w", dim=list(weight.shape), stride=list(descriptor_stride(weight)), data_type=kind
            )
            spatial = x.dim() - 2
            y = g.conv_fprop(
                image=tx, weight=tw, padding=[0] * spatial, stride=[1] * spatial, dilation=[1] * spatial
            )
            tb = None
            if bias is not None:
                b = bias.view(1, -1, *[1] * spatial)
                tb = g.tensor(name="b", dim=list(b.shape), stride=list(b.stride()), data_type=kind)
                y = g.bias(name="bias", input=y, bias=tb)
            y.set_output(True).set_data_type(kind).set_dim(list(out.shape)).set_stride(list(out.stride()))
            g.validate()
            g.build_operation_graph()
            g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            g.check_support()
            stats["plans"] = g.get_execution_plan_count()
            indices, failed = _build_plans(g, cudnn)
        except Exception as exc:  # cuDNN's graph refuses this signature: PyTorch's convolution runs it
            stats["build_s"] = time.perf_counter() - t0
            return _Built(None, f"{type(exc).__name__}: {exc}"[:1000], stats)
        stats.update(built=len(indices), build_s=time.perf_counter() - t0)
        if failed:
            stats.update(build_failed=len(failed), build_errors=failed[:2])
        if not indices:
            return _Built(None, "no plan built" + (f" ({failed[0]})" if failed else ""), stats)
        torch_ms = _time_ms(lambda: torch_conv(x, weight, bias))
        stats["torch_ms"] = torch_ms
        best: _Plan | None = None
        errors = []
        times, dropped = {}, {}
        for i in indices:
            try:
                workspace = torch.empty(
                    max(g.get_workspace_size_plan_at_index(i), 1), dtype=torch.uint8, device=x.device
                )
                plan = _Plan(g, (tx, tw, tb, y), i, workspace, 0.0)
                limit = SLOW_PLAN * min(torch_ms, best.ms if best else torch_ms) + SLOW_PLAN_MARGIN_MS
                plan.ms = _time_ms(
                    lambda plan=plan: self._execute(plan, x, weight, bias, out), give_up_ms=limit
                )
            except Exception as exc:  # a plan that builds but does not run at this shape
                errors.append(f"plan {i}: {type(exc).__name__}: {exc}"[:300])
                continue
            if plan.ms > limit:
                dropped[i] = round(plan.ms, 4)
                continue
            times[i] = round(plan.ms, 4)
            if best is None or plan.ms < best.ms:
                best = plan
        stats.update(ran=len(times), plan_ms=times, select_s=time.perf_counter() - t0)
        if dropped:
            stats["dropped_ms"] = dropped
        if errors:
            stats["errors"] = errors[:3]
        if best is None:
            why = f"every plan over {SLOW_PLAN:g}x PyTorch's time" if dropped else "no plan ran"
            return _Built(None, why + (f" ({errors[0]})" if errors else ""), stats)
        stats.update(index=best.index, ms=best.ms)
        try:
            stats["name"] = g.get_plan_name_at_index(best.index)
        except Exception:  # the name is for the record only
            pass
        if self.keep_faster and torch_ms <= best.ms:  # e.g. the 3-channel output convolution
            why = f"PyTorch's convolution is faster ({torch_ms:.3f} against {best.ms:.3f} ms)"
            return _Built(None, why, stats)
        return _Built(best, None, stats)

    def summary(self) -> list[dict]:
        """One row per signature this GraphConvs met: shapes, bias, chosen plan (None: PyTorch's
        convolution, with why) and what choosing cost."""
        rows = []
        for key, plan in self.plans.items():
            x_shape, _, w_shape, _, bias, _ = key
            row = {"input": list(x_shape), "weight": list(w_shape), "bias": bias, "graph": plan is not None}
            row.update(self.stats.get(key, {}))
            if key in self.refused:
                row["refused"] = self.refused[key][:300]
            rows.append(row)
        return rows


def _build_plans(g, cudnn) -> tuple[list[int], list[str]]:
    """Build the first MAX_PLANS plans cuDNN can build, in its heuristic order, for at most BUILD_S
    seconds after the first (a build may compile a kernel; 4 x BUILD_S while none has built); their
    indices, and the first failures."""
    count = g.get_execution_plan_count()
    if not hasattr(g, "build_plan_at_index"):
        g.build_plans(cudnn.build_plan_policy.ALL)
        return list(range(min(count, MAX_PLANS))), []
    built, failed = [], []
    t0 = time.perf_counter()
    for i in range(count):
        if time.perf_counter() - t0 > (BUILD_S if built else 4 * BUILD_S):
            break
        try:
            g.build_plan_at_index(i)
        except Exception as exc:  # a plan this GPU or shape cannot have
            failed.append(f"plan {i}: {type(exc).__name__}: {exc}"[:300])
            continue
        built.append(i)
        if len(built) == MAX_PLANS:
            break
    return built, failed


def _out_shape(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, ...]:
    return (x.shape[0], weight.shape[0], *(n - k + 1 for n, k in zip(x.shape[2:], weight.shape[2:])))


def _time_ms(fn: Callable[[], None], reps: int = 3, give_up_ms: float = float("inf")) -> float:
    """Best of `reps` timed calls after a first one (milliseconds, CUDA events); the first call's time
    alone where it exceeds give_up_ms (a plan not worth its repetitions: some take seconds a call)."""
    first = _event_ms(fn)
    if first > give_up_ms:
        return first
    return min(_event_ms(fn) for _ in range(reps))


def _event_ms(fn: Callable[[], None]) -> float:
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end)
