"""The gradient of a gradient-matching objective for chain models, without autograd's double backward.

Optimisation attacks (DLG, iDLG, Inverting Gradients) minimise ``L(g(x))`` where ``g(x) = ∇θ ℓ(F_θ(x), y)`` is
the trial gradient and ``L`` a distance to the observed one (:mod:`attacker.matching`). The usual way (the
original DLG script, ``inversefed``, breaching) builds ``g`` with ``create_graph=True`` and back-propagates ``L``
through that graph. This module computes the same ``∇x L`` for models that are a *chain* of layers
(``F = f_n ∘ … ∘ f_1``: convolutions, linear layers, element-wise activations, max-pooling, flattening — what
:func:`torch.fx.symbolic_trace` sees as a straight line), in four explicit passes and no autograd graph:

1. forward ``h_i = f_i(h_{i−1})``;
2. backward ``δ_{i−1} = J_{h,i}ᵀ δ_i`` from ``δ_n = ∂ℓ/∂F = (softmax(F) − q)/B`` (``q`` the one-hot or soft
   labels), with the parameter gradients ``g_i = J_{θ,i}ᵀ δ_i``;
3. ``w = ∂L/∂g`` on the detached ``g`` (a few vector operations; :meth:`attacker.matching.Target.value_and_weights`),
   so the distance's norms and clipping are never differentiated through the network;
4. ``∇x L = ∇x ⟨g(x), w⟩`` (the Jacobian-transpose product ``J_gᵀ w``) by reverse over forward: a tangent pass
   ``t_i = J_{h,i} t_{i−1} + J_{θ,i} w_i`` (the directional derivative of the network in θ along ``w``, so
   ``⟨g, w⟩ = ⟨δ_n, t_n⟩``), then one backward pass ``h̄_{i−1} = J_{h,i}ᵀ h̄_i + ∂_{h}⟨δ_i, J_{θ,i} w_i⟩ +
   ∂_{h}⟨δ_i, J_{h,i} t_{i−1}⟩`` from ``h̄_n = J_softmaxᵀ t_n / B``. The backward pass of step 2 is reused (``δ``
   is the adjoint of ``t``), so nothing is computed twice. The last term is ``σ''(h) ⊙ t ⊙ δ`` for smooth
   activations and zero for ReLU, leaky ReLU, max-pooling and the affine layers.

The multiply–adds are those of autograd's double backward (per convolution: forward, input and weight gradient,
two in the tangent pass, two in the last backward pass), but the two products of each pass that share an output
run as one convolution over concatenated channels (``[t, h]`` against ``[W, w]``, ``[h̄, δ]`` against
``[W; w]``), and the ~150 autograd nodes per evaluation of a small CNN — whose bookkeeping, not arithmetic, is most
of an evaluation on DLG's LeNet — are gone. The result equals autograd's to float rounding (tests compare them on
every supported layer type). Models that are not such a chain, or use a layer not listed above (batch norm,
dropout in train mode, residual blocks), get ``None`` from :func:`compile_chain` and callers keep autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


class _Layer:
    """One link of the chain. ``ctx`` is what :meth:`forward` keeps for the other passes."""

    params: tuple[int | None, int | None] = (None, None)  # indices (weight, bias) into the model's parameters

    def forward(self, h: Tensor) -> tuple[Tensor, object]:
        raise NotImplementedError

    def vjp(self, h: Tensor, ctx: object, d: Tensor) -> Tensor:
        """``J_hᵀ d``."""
        raise NotImplementedError

    def jvp(self, h: Tensor, ctx: object, t: Tensor) -> Tensor:
        """``J_h t``."""
        raise NotImplementedError

    def curvature(self, h: Tensor, ctx: object, t: Tensor, d: Tensor) -> Tensor | None:
        """``∂/∂h ⟨d, J_h(h) t⟩`` (``None`` when it is zero)."""
        return None


class _Elementwise(_Layer):
    """``y = σ(h)`` element-wise; ``ctx`` is ``(σ'(h), σ''(h)/σ'(h) or None)``."""

    def __init__(self, kind: str, slope: float = 0.0):
        self.kind, self.slope = kind, slope

    def forward(self, h: Tensor) -> tuple[Tensor, object]:
        if self.kind == "relu":
            y = torch.relu(h)
            return y, ((h > 0).to(h.dtype), None)
        if self.kind == "leaky":
            y = F.leaky_relu(h, self.slope)
            return y, (torch.where(h > 0, 1.0, self.slope).to(h.dtype), None)
        if self.kind == "sigmoid":
            y = torch.sigmoid(h)
            d1 = y * (1 - y)
            return y, (d1, 1 - 2 * y)  # σ'' = σ'(1 − 2σ)
        y = torch.tanh(h)  # tanh
        return y, (1 - y * y, -2 * y)  # tanh'' = tanh'·(−2 tanh)

    def vjp(self, h, ctx, d):
        return d * ctx[0]

    def jvp(self, h, ctx, t):
        return t * ctx[0]

    def curvature(self, h, ctx, t, d):
        d1, ratio = ctx
        return None if ratio is None else t * d * d1 * ratio


class _MaxPool(_Layer):
    def __init__(self, m: nn.MaxPool2d):
        pair = nn.modules.utils._pair
        self.args = (pair(m.kernel_size), pair(m.stride if m.stride is not None else m.kernel_size),
                     pair(m.padding), pair(m.dilation), bool(m.ceil_mode))

    def forward(self, h):
        y, idx = torch.ops.aten.max_pool2d_with_indices(h, *self.args)
        return y, idx

    def vjp(self, h, idx, d):
        return torch.ops.aten.max_pool2d_with_indices_backward(d, h, *self.args, idx)

    def jvp(self, h, idx, t):
        return t.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)


class _Flatten(_Layer):
    def forward(self, h):
        return h.flatten(1), None

    def vjp(self, h, ctx, d):
        return d.view(h.shape)

    def jvp(self, h, ctx, t):
        return t.flatten(1)


class _Affine(_Layer):
    """A convolution or linear layer ``z = K(W) h + b``, affine in both ``h`` and the parameters."""

    def __init__(self, m: nn.Module, weight: int, bias: int | None):
        self.m = m
        self.params = (weight, bias)
        self.conv = isinstance(m, nn.Conv2d)
        if self.conv:
            self.args = (list(m.stride), list(m.padding), list(m.dilation))

    def forward(self, h):
        m = self.m
        if self.conv:
            return F.conv2d(h, m.weight, m.bias, m.stride, m.padding, m.dilation), None
        return F.linear(h, m.weight, m.bias), None

    def backward(self, h: Tensor, d: Tensor, mask: tuple[bool, bool, bool]) -> tuple:
        """``(J_hᵀ d, ∇W, ∇b)``, each ``None`` where ``mask`` says it is not needed."""
        m = self.m
        if self.conv:
            bias = [m.weight.shape[0]] if mask[2] else None
            gi, gw, gb = torch.ops.aten.convolution_backward(d, h, m.weight, bias, *self.args, False, [0, 0], 1,
                                                             list(mask))
            return gi, gw, gb
        return (d @ m.weight if mask[0] else None, d.T @ h if mask[1] else None, d.sum(0) if mask[2] else None)

    def vjp(self, h, ctx, d):
        return self.backward(h, d, (True, False, False))[0]

    def tangent(self, h: Tensor, t: Tensor | None, ww: Tensor | None, wb: Tensor | None) -> Tensor | None:
        """``K(W) t + K(w_W) h + w_b`` (the tangent of ``z`` along the parameter direction ``w``)."""
        m = self.m
        if t is not None and ww is not None:  # one product over concatenated channels
            inp, weight = torch.cat((t, h), 1), torch.cat((m.weight, ww), 1)
        elif t is not None:
            inp, weight = t, m.weight
        elif ww is not None:
            inp, weight = h, ww
        else:
            if wb is None:
                return None
            shape = [1, -1] + [1] * (h.dim() - 2)
            return wb.view(shape).expand(h.shape[0], -1, *self._out_spatial(h))
        if self.conv:
            return F.conv2d(inp, weight, wb, m.stride, m.padding, m.dilation)
        return F.linear(inp, weight, wb)

    def _out_spatial(self, h: Tensor) -> list[int]:
        if not self.conv:
            return []
        m = self.m
        return [(h.shape[2 + i] + 2 * m.padding[i] - m.dilation[i] * (m.kernel_size[i] - 1) - 1) // m.stride[i] + 1
                for i in range(2)]

    def adjoint(self, h: Tensor, hbar: Tensor, d: Tensor, ww: Tensor | None) -> Tensor:
        """``K(W)ᵀ h̄ + K(w_W)ᵀ d`` (the input adjoint of the tangent pass's product, plus the ordinary VJP)."""
        m = self.m
        if ww is not None:
            go, weight = torch.cat((hbar, d), 1), torch.cat((m.weight, ww), 0)
        else:
            go, weight = hbar, m.weight
        if self.conv:
            return torch.ops.aten.convolution_backward(go, h, weight, None, *self.args, False, [0, 0], 1,
                                                       [True, False, False])[0]
        return go @ weight


_ACTIVATIONS = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
_FUNCTIONS = {torch.relu: "relu", F.relu: "relu", torch.sigmoid: "sigmoid", torch.tanh: "tanh",
              F.sigmoid: "sigmoid", F.tanh: "tanh"}


def _flatten_args_ok(node) -> bool:
    args = list(node.args[1:])
    start = args[0] if args else node.kwargs.get("start_dim", 0)
    end = args[1] if len(args) > 1 else node.kwargs.get("end_dim", -1)
    return start == 1 and end == -1


def _layer_for(node, model: nn.Module, index: dict[int, int]) -> _Layer | None:
    if node.op == "call_module":
        m = model.get_submodule(node.target)
        if isinstance(m, nn.Conv2d):
            if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                return None
            return _Affine(m, index[id(m.weight)], None if m.bias is None else index[id(m.bias)])
        if isinstance(m, nn.Linear):
            return _Affine(m, index[id(m.weight)], None if m.bias is None else index[id(m.bias)])
        if type(m) in _ACTIVATIONS:
            return _Elementwise(_ACTIVATIONS[type(m)])
        if isinstance(m, nn.LeakyReLU):
            return _Elementwise("leaky", float(m.negative_slope))
        if isinstance(m, nn.MaxPool2d) and not m.return_indices:
            return _MaxPool(m)
        if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            return _Flatten()
        if isinstance(m, nn.Identity):
            return "identity"  # type: ignore[return-value]
        return None
    if node.op == "call_function":
        if node.target in _FUNCTIONS and not node.kwargs.get("inplace", False) and len(node.args) == 1:
            return _Elementwise(_FUNCTIONS[node.target])
        if node.target is torch.flatten and _flatten_args_ok(node):
            return _Flatten()
        return None
    if node.op == "call_method":
        if node.target in ("relu", "sigmoid", "tanh") and len(node.args) == 1 and not node.kwargs:
            return _Elementwise(node.target)
        if node.target == "flatten" and _flatten_args_ok(node):
            return _Flatten()
    return None


@dataclass
class Chain:
    """A model seen as a chain of layers, with the parameters that take part in the matching.

    Attributes:
        layers: the links, input first.
        needed: indices (into ``model.parameters()``) of the parameters whose gradient is matched, in the order
            the caller's gradient lists use.
        num_classes: output width.
    """

    layers: list[_Layer]
    needed: list[int]
    num_classes: int

    def __post_init__(self):
        pos = {p: j for j, p in enumerate(self.needed)}
        self._slots = [tuple(None if i is None else pos.get(i) for i in layer.params) for layer in self.layers]
        affine = [k for k, s in enumerate(self._slots) if any(v is not None for v in s)]
        self._lowest = affine[0] if affine else len(self.layers)

    def gradients(self, x: Tensor, soft: Tensor | None, labels: Tensor | None) -> tuple[list[Tensor], object]:
        """Passes 1–2: the trial gradients (``needed`` order) of the cross-entropy of ``x`` and what pass 4 needs.

        Args:
            x: ``(B, C, H, W)`` (or ``(B, D)``) inputs.
            soft: ``(B, num_classes)`` label logits for the soft-label loss of DLG, or ``None``.
            labels: ``int64 (B,)`` hard labels when ``soft`` is ``None``.
        """
        hs, ctxs = [x], []
        h = x
        for layer in self.layers:
            h, ctx = layer.forward(h)
            hs.append(h)
            ctxs.append(ctx)
        b = x.shape[0]
        s = torch.softmax(h, -1)
        # one-hot by scatter: F.one_hot checks the labels' range with a host sync on every call
        q = torch.softmax(soft, -1) if soft is not None else torch.zeros_like(h).scatter_(1, labels.view(-1, 1), 1.0)
        d = (s - q) / b
        ds: list[Tensor | None] = [None] * len(self.layers)
        grads: list[Tensor | None] = [None] * len(self.needed)
        for k in range(len(self.layers) - 1, self._lowest - 1, -1):
            layer, slots = self.layers[k], self._slots[k]
            ds[k] = d
            below = k > self._lowest
            if isinstance(layer, _Affine):
                mask = (below, slots[0] is not None, slots[1] is not None)
                gi, gw, gb = layer.backward(hs[k], d, mask) if any(mask) else (None, None, None)
                if slots[0] is not None:
                    grads[slots[0]] = gw
                if slots[1] is not None:
                    grads[slots[1]] = gb
                d = gi
            elif below:
                d = layer.vjp(hs[k], ctxs[k], d)
        return grads, (hs, ctxs, ds, s, q, soft is not None)

    def pullback(self, state: object, w: list[Tensor | None]) -> tuple[Tensor, Tensor | None]:
        """Pass 4: ``∇x ⟨g(x), w⟩`` (and ``∇`` of the label logits for the soft-label loss).

        Args:
            state: the second value returned by :meth:`gradients` for the same ``x``.
            w: one tensor per needed parameter (``None`` = zero).
        """
        hs, ctxs, ds, s, q, soft = state
        n = len(self.layers)
        ts: list[Tensor | None] = [None] * (n + 1)  # tangent at the input of layer k
        t = None
        for k in range(self._lowest, n):
            layer, slots = self.layers[k], self._slots[k]
            ts[k] = t
            if isinstance(layer, _Affine):
                ww = w[slots[0]] if slots[0] is not None else None
                wb = w[slots[1]] if slots[1] is not None else None
                t = layer.tangent(hs[k], t, ww, wb)
            elif t is not None:
                t = layer.jvp(hs[k], ctxs[k], t)
        b = hs[0].shape[0]
        if t is None:
            return torch.zeros_like(hs[0]), (torch.zeros_like(q) if soft else None)
        t = t / b
        st = s * t
        hbar = st - s * st.sum(-1, keepdim=True)  # J_softmax(F)ᵀ t_n / B (the Jacobian is symmetric)
        qbar = None
        if soft:
            qt = q * t
            qbar = -(qt - q * qt.sum(-1, keepdim=True))
        for k in range(n - 1, -1, -1):
            layer, h = self.layers[k], hs[k]
            if isinstance(layer, _Affine):
                slots = self._slots[k]
                ww = w[slots[0]] if slots[0] is not None and k >= self._lowest else None
                hbar = layer.adjoint(h, hbar, ds[k], ww) if ww is not None else layer.vjp(h, None, hbar)
            else:
                nxt = layer.vjp(h, ctxs[k], hbar)
                if k >= self._lowest and ts[k] is not None:
                    extra = layer.curvature(h, ctxs[k], ts[k], ds[k])
                    if extra is not None:
                        nxt = nxt + extra
                hbar = nxt
        return hbar, qbar


def compile_chain(model: nn.Module, needed: list[int], example: Tensor) -> Chain | None:
    """Read ``model`` as a :class:`Chain` (``None`` when it is not one; then use autograd).

    The model is traced with :func:`torch.fx.symbolic_trace`; every node must take the previous node's output as
    its only tensor input and be one of the layers in the module docstring (convolutions with ``groups = 1`` and
    zero padding). The chain's forward is then checked against ``model(example)``.

    Args:
        model: the attacker's model copy (its parameters are read live, so later updates are seen).
        needed: indices into ``model.parameters()`` of the parameters whose gradient is matched.
        example: an input batch of the right shape (values do not matter).
    """
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    if any(mod.training and isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.Dropout)) for mod in model.modules()):
        return None
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 — anything fx cannot trace is simply not a chain
        return None
    layers: list[_Layer] = []
    prev = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if prev is not None:
                return None
            prev = node
            continue
        if node.op == "output":
            if node.args != (prev,):
                return None
            break
        tensors = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.fx.Node)]
        if prev is None or tensors != [prev] or node.args[:1] != (prev,) or len(prev.users) != 1:
            return None
        layer = _layer_for(node, model, index)
        if layer is None:
            return None
        if layer != "identity":
            layers.append(layer)
        prev = node
    else:
        return None
    used = [i for layer in layers for i in layer.params if i is not None]
    if sorted(used) != list(range(len(params))):
        return None
    chain = Chain(layers, list(needed), 0)
    with torch.no_grad():
        ref = model(example)
        h = example
        for layer in layers:
            if isinstance(layer, _Affine) and not layer.conv and h.dim() != 2:
                return None
            h, _ = layer.forward(h)
    if h.shape != ref.shape or h.dim() != 2 or not torch.allclose(h, ref, rtol=1e-5, atol=1e-6):
        return None
    chain.num_classes = int(h.shape[-1])
    return chain


#: ``(grads) -> (value, w)`` with ``w = ∂value/∂grads`` (one tensor or ``None`` per needed parameter).
Weights = Callable[[list[Tensor]], tuple[Tensor, list[Tensor | None]]]


def value_and_grad(chain: Chain, weights: Weights, x: Tensor, soft: Tensor | None = None,
                   labels: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``L(g(x))`` and its gradient in ``x`` (and in the label logits ``soft``), see the module docstring.

    Args:
        chain: from :func:`compile_chain`.
        weights: the objective on the detached trial gradients and its gradient ``w``
            (:meth:`attacker.matching.Target.value_and_weights`).
        x: ``(B, ...)`` inputs (not modified; no ``requires_grad`` needed).
        soft: ``(B, num_classes)`` label logits (DLG's joint optimisation) or ``None``.
        labels: ``int64 (B,)`` labels when ``soft`` is ``None``.

    Returns:
        ``(value, ∇x, ∇soft or None)``; ``value`` a 0-dim tensor.
    """
    with torch.no_grad():
        grads, state = chain.gradients(x, soft, labels)
    value, w = weights(grads)
    with torch.no_grad():
        gx, gs = chain.pullback(state, w)
    return value, gx, gs

