"""The layer seam: what one layer type must provide to the model.

A network (:class:`~dbnode.model.ModelSpec`) is a sequence of layers; the
layer stack (:class:`~dbnode.model.LayerStack`), the flat parameter blocks
(:mod:`dbnode.blocks`) and the placement's parameter counts only ever ask a
layer for the three things below, so a new layer type (convolution,
embedding) is one class here plus its kernels and their numpy twins:

* ``params()`` — its parameters' names (within the layer) and shapes;
* ``forward(x, params, out, scratch)`` — its activations for a batch;
* ``backward(...)`` — its parameter gradients and the delta below it.

Today there is one: :class:`Dense`, the original project's fully connected
layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels

__all__ = ["Dense"]


@dataclass(frozen=True)
class Dense:
    """A fully connected layer: ``out = act(x @ weight.T + bias)``.

    ``weight`` is ``(n_out, n_in)`` and ``bias`` ``(n_out,)``: the original
    project's ``[bias | weight]`` matrix, split (see
    :func:`dbnode.model.from_bias_first`).

    Attributes:
        n_in: input features.
        n_out: outputs.
        activation: ``sigmoid``, ``tanh``, ``relu``, ``linear`` or ``softmax``.
    """

    n_in: int
    n_out: int
    activation: str

    def params(self) -> dict[str, tuple[int, ...]]:
        """Parameter name (within the layer) -> shape.

        Returns:
            ``{"weight": (n_out, n_in), "bias": (n_out,)}``.
        """
        return {"weight": (self.n_out, self.n_in), "bias": (self.n_out,)}

    def forward(self, x: np.ndarray, params: dict[str, np.ndarray], out: np.ndarray,
                scratch: np.ndarray) -> np.ndarray:  # fmt: skip
        """The activations of batch ``x`` into ``out`` (returned); ``scratch``
        takes the transposed GEMM result.

        Args:
            x: the input batch, ``(batch, n_in)``.
            params: the layer's ``weight`` and ``bias``.
            out: where the activations are written, ``(batch, n_out)``.
            scratch: a buffer of ``out``'s size.

        Returns:
            ``out``.

        Raises:
            ValueError, TypeError: shapes or dtypes that do not fit (from the kernel).
        """
        return kernels.dense_forward(x, params["weight"], params["bias"], self.activation,
                                     out=out, scratch=scratch)  # fmt: skip

    def backward(
        self,
        x: np.ndarray,
        out: np.ndarray,
        delta: np.ndarray,
        params: dict[str, np.ndarray],
        grads: dict[str, np.ndarray],
        *,
        delta_below: np.ndarray,
        dz: np.ndarray,
        need_delta_below: bool = True,
        preactivation: bool = False,
    ) -> None:
        """Gradients of the last forward into ``grads`` given ``delta = dL/d(out)``,
        and ``dL/dx`` into ``delta_below`` when ``need_delta_below``.

        Args:
            x: the input of the forward pass.
            out: its output.
            delta: dL/d(out), or dL/d(pre-activation) with ``preactivation``
                (softmax with cross-entropy).
            params: the layer's ``weight`` and ``bias``.
            grads: where ``weight`` and ``bias`` gradients are written.
            delta_below: where dL/dx is written.
            dz: scratch of ``out``'s shape.
            need_delta_below: whether to compute dL/dx at all.
            preactivation: see ``delta``.
        """
        kernels.dense_backward(
            x, out, delta, params["weight"], "linear" if preactivation else self.activation,
            grad_weight=grads["weight"], grad_bias=grads["bias"],
            delta_below=delta_below, dz=dz, need_delta_below=need_delta_below,
        )  # fmt: skip
