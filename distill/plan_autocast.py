"""CUDA autocast's dtype rules on the ``meta`` device, so ``distill plan`` sizes a bf16 run's saved tensors.

``torch.autocast`` is a dispatch key of CUDA / CPU tensors; meta tensors never reach it, so a meta forward
under ``torch.autocast("cuda")`` runs in fp32 and every tensor autograd saves is counted at 4 bytes per
element. :class:`MetaAutocast` re-applies the casts autocast would make, as a ``TorchFunctionMode``: it
sits above autograd like autocast does, so the casts are recorded in the graph and the tensors the next op
saves for backward have autocast's dtypes. The op lists are CUDA autocast's (PyTorch
``aten/src/ATen/autocast_mode.cpp``, ``lower_precision_fp`` and ``fp32`` lists) at the level of the
public functions modules call:

* **lower precision** (matmul / conv family, attention): floating inputs cast to bf16. As in autocast,
  the cast of a leaf tensor that requires grad (a trainable weight) is cached for the whole autocast region
  (one engine micro-batch), so the student's bf16 weight copy is made and saved once, not once per use.
* **fp32** (norms, softmax, exp / log / pow, losses): floating inputs cast to fp32.
* everything else runs in its inputs' dtype (elementwise ops, views), as under autocast.

Attention: ``F.scaled_dot_product_attention`` on meta would pick the math kernel, which saves the
``[B, heads, L, L]`` attention matrix; on a GPU (and on CPU without a mask) a fused kernel (flash /
memory-efficient) saves only ``q, k, v``, the output, the fp32 log-sum-exp ``[B, heads, L]`` and the mask.
On meta tensors the call is replaced by :class:`_FusedAttentionMemory`, which saves exactly those (its
output has the right shape and dtype; it has no backward: plan never runs one). This applies with and
without autocast (``dtype=None``: no casts).

Data-dependent scalars: a meta tensor has no value, so ``item()``, ``int()``, ``float()`` and ``bool()`` of one
(e.g. a loss counting its non-finite rows, SiD) would fail; they return 0 / 0.0 / False instead, the
all-finite, nothing-dropped path, and ``scalars_read`` counts them so that plan can say so.

Limits: only the top-level call of a Python-level torch function is seen (a composite such as
``F.multi_head_attention_forward`` is not unfolded); regions that turn autocast off
(``torch.autocast(enabled=False)``) are not seen on meta (in DMD2 the one such region is under
``no_grad`` and saves nothing).
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

LOWER = {"linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
         "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv", "addr", "mv",
         "einsum", "chain_matmul", "multi_dot", "prelu", "scaled_dot_product_attention", "linalg_vecdot"}
FP32 = {"layer_norm", "group_norm", "rms_norm", "softmax", "log_softmax", "exp", "expm1", "log", "log10", "log2",
        "log1p", "pow", "__pow__", "rsqrt", "reciprocal", "acos", "asin", "cosh", "sinh", "tan", "erfinv",
        "softplus", "cumsum", "cumprod", "prod", "norm", "vector_norm", "logsumexp", "mse_loss", "l1_loss",
        "smooth_l1_loss", "huber_loss", "binary_cross_entropy_with_logits", "cross_entropy", "nll_loss",
        "kl_div", "cosine_similarity", "cdist", "dist", "renorm"}


_SCALARS = {"item": 0, "__int__": 0, "__float__": 0.0, "__bool__": False}


class _FusedAttentionMemory(torch.autograd.Function):
    """What a fused attention kernel keeps for backward: q, k, v, output, fp32 log-sum-exp (and the mask)."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, *([mask] if mask is not None else []))
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - plan never runs backward on meta
        raise RuntimeError("memory-plan attention has no backward")


def _attention(args, kwargs):
    names = ("query", "key", "value", "attn_mask")
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    mask = bound.get("attn_mask")
    return _FusedAttentionMemory.apply(bound["query"], bound["key"], bound["value"],
                                       mask if isinstance(mask, torch.Tensor) else None)


class MetaAutocast(TorchFunctionMode):
    """Autocast's casts as a torch-function mode (see the module docstring). ``dtype``: bf16 (or fp16), or None
    for no casts (fused-attention accounting only)."""

    def __init__(self, dtype: torch.dtype | None = torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        self._cache: dict[int, torch.Tensor] = {}
        self.scalars_read = 0

    def _cast(self, x, dtype: torch.dtype):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()) or x.dtype == dtype:
            return x
        if dtype == self.dtype and x.is_leaf and x.requires_grad:  # autocast's weight-cast cache
            key = id(x)
            if key not in self._cache:
                self._cache[key] = x.to(dtype)
            return self._cache[key]
        return x.to(dtype)

    def _cast_all(self, value, dtype):
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast_all(v, dtype) for v in value)
        return self._cast(value, dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _SCALARS and args and getattr(args[0], "is_meta", False):
            self.scalars_read += 1
            return _SCALARS[name]
        dtype = None
        if self.dtype is not None:
            dtype = self.dtype if name in LOWER else torch.float32 if name in FP32 else None
        if dtype is not None:
            args = self._cast_all(args, dtype)
            kwargs = {k: self._cast_all(v, dtype) for k, v in kwargs.items()}
        if name == "scaled_dot_product_attention":
            query = args[0] if args else kwargs.get("query")
            if getattr(query, "is_meta", False):
                return _attention(args, kwargs)
        return func(*args, **kwargs)

    def __exit__(self, *exc):
        self._cache.clear()  # autocast clears its cache when the region ends
        return super().__exit__(*exc)


def autocast_dtype(mixed_precision) -> torch.dtype | None:
    """The autocast dtype the engine uses for ``train.mixed_precision`` (None: fp32, no autocast)."""
    mode = {"bfloat16": "bf16", "float16": "fp16"}.get(str(mixed_precision), str(mixed_precision))
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
