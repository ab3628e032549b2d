"""Networks: the model description, its parameters and the compiled
forward/backward passes over a contiguous block of layers (its layer types:
:mod:`dbnode.layers`; its flat parameter blocks: :mod:`dbnode.blocks`).

Parameters are a flat dict of named arrays, ``layer{i}.weight`` of shape
``(out, in)`` and ``layer{i}.bias`` of shape ``(out,)`` — the names the
parameter shards and the ``.npz`` files use.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import kernels
from .layers import Dense

HIDDEN_ACTIVATIONS = ("sigmoid", "tanh", "relu", "linear")
OUTPUTS = ("sigmoid", "softmax", "linear")
LOSSES = ("squared_error", "cross_entropy")
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class ModelSpec:
    """What a network is: layer sizes (input first) and how it computes.

    The defaults are the original project's: sigmoid everywhere and the
    squared error ``0.5 * (t - p)**2``.

    Args:
        layers: the sizes, input first; at least two, each a positive int.
        activation: of the hidden layers, one of :data:`HIDDEN_ACTIVATIONS`.
        output: of the last layer, one of :data:`OUTPUTS`.
        loss: one of :data:`LOSSES`; ``cross_entropy`` needs a ``softmax``
            output (class labels) or a ``sigmoid`` one (binary log-loss of
            each output against a target in [0, 1]).
        dtype: ``float32`` or ``float64``.

    Raises:
        ValueError: any of the above not met; the message names the field.
    """

    layers: tuple[int, ...]
    activation: str = "sigmoid"
    output: str = "sigmoid"
    loss: str = "squared_error"
    dtype: str = "float32"

    def __post_init__(self):
        layers = tuple(self.layers)
        object.__setattr__(self, "layers", layers)
        if len(layers) < 2:
            raise ValueError(f"layers: need at least an input and an output size, got {layers}")
        for size in layers:
            if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
                raise ValueError(f"layers: sizes must be positive integers, got {layers}")
        _choice("activation", self.activation, HIDDEN_ACTIVATIONS)
        _choice("output", self.output, OUTPUTS)
        _choice("loss", self.loss, LOSSES)
        _choice("dtype", self.dtype, DTYPES)
        if self.loss == "cross_entropy" and self.output not in ("softmax", "sigmoid"):
            raise ValueError(
                f"loss: cross_entropy needs output = 'softmax' or 'sigmoid', got {self.output!r}"
            )

    @property
    def takes_labels(self) -> bool:
        """Whether the targets are class labels (softmax with cross-entropy)
        rather than one value per output."""
        return self.loss == "cross_entropy" and self.output == "softmax"

    @property
    def n_layers(self) -> int:
        """The number of layers with parameters (sizes less one)."""
        return len(self.layers) - 1

    @property
    def np_dtype(self) -> np.dtype:
        """:attr:`dtype` as a numpy dtype."""
        return np.dtype(self.dtype)

    def activation_of(self, layer: int) -> str:
        """The activation of a layer.

        Args:
            layer: its index, 0 the first above the input.

        Returns:
            :attr:`output` for the last layer, else :attr:`activation`.
        """
        return self.output if layer == self.n_layers - 1 else self.activation

    def layer(self, i: int) -> Dense:
        """Layer ``i`` (0 is the first above the input).

        Args:
            i: the layer's index, in ``0 .. n_layers - 1``.

        Returns:
            The layer, with its sizes and activation.

        Raises:
            IndexError: ``i`` is past the last layer.
        """
        return Dense(self.layers[i], self.layers[i + 1], self.activation_of(i))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every parameter (``layer{i}.{name}``), in layer order.

        Returns:
            A new dict, ``layer{i}.weight`` before ``layer{i}.bias``.
        """
        return {f"layer{i}.{name}": shape for i in range(self.n_layers)
                for name, shape in self.layer(i).params().items()}  # fmt: skip


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


# ------------------------------------------------------------ parameters


def init_params(spec: ModelSpec, init: str = "normal:0.2", seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh parameters. ``init`` is ``normal:STD`` (the original project's
    Normal(0, 0.2) is ``normal:0.2``), ``xavier`` (Glorot normal) or ``he``
    (He normal); biases are drawn like weights for ``normal`` (as the
    original did) and start at zero otherwise.

    Args:
        spec: the network.
        init: the initialisation, as above.
        seed: seeds the random draws.

    Returns:
        Name -> aligned array of the model's dtype, for every parameter.

    Raises:
        ValueError: ``init`` is none of the above.
    """
    rng = np.random.default_rng(seed)
    dtype = spec.np_dtype
    params = {}
    kind, _, arg = init.partition(":")
    if kind == "normal":
        try:
            std = float(arg) if arg else 0.2
        except ValueError:
            raise ValueError(f"init: bad standard deviation in {init!r}") from None
    elif kind not in ("xavier", "he") or arg:
        raise ValueError(f"init: {init!r} is not normal:STD, xavier or he")
    for name, shape in spec.shapes().items():
        fan_in = spec.layers[int(name[5 : name.index(".")])]
        fan_out = shape[0]
        if kind == "normal":
            value = rng.normal(0.0, std, shape)
        elif name.endswith(".bias"):
            value = np.zeros(shape)
        elif kind == "xavier":
            value = rng.normal(0.0, np.sqrt(2.0 / (fan_in + fan_out)), shape)
        else:
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        params[name] = kernels.aligned_copy(value, dtype)
    return params


def check_params(spec: ModelSpec, params: dict[str, np.ndarray], where: str = "parameters") -> None:
    """Raise ValueError naming the first missing, extra or misshapen array.

    Args:
        spec: the network.
        params: name -> array, to check against :meth:`ModelSpec.shapes`.
        where: what the message calls ``params`` (e.g. a file name).

    Raises:
        ValueError: an array is missing, unexpected or of the wrong shape.
    """
    shapes = spec.shapes()
    missing = sorted(set(shapes) - set(params))
    extra = sorted(set(params) - set(shapes))
    if missing or extra:
        raise ValueError(f"{where}: missing {missing}, unexpected {extra} for layers {spec.layers}")
    for name, shape in shapes.items():
        if params[name].shape != shape:
            raise ValueError(
                f"{where}: {name} has shape {params[name].shape}, layers {spec.layers} need {shape}"
            )


#: The ``.npz`` member that holds a saved model's description (JSON text):
#: what :func:`save_params` writes beside the arrays when given one, and
#: what :func:`load_params` leaves out of the parameters.
DESCRIPTION = "dbnode.json"


def save_params(
    path: str | Path, params: dict[str, np.ndarray], description: dict | None = None
) -> None:
    """Write ``layer{i}.weight`` / ``layer{i}.bias`` arrays to an ``.npz``.

    Args:
        path: the file (numpy adds ``.npz`` when it lacks the suffix).
        params: name -> array.
        description: JSON-able facts stored beside the arrays (as a text
            array, readable without pickle) -- what makes the file stand
            alone; :func:`read_description` reads it back.

    Raises:
        OSError: the file cannot be written.
    """
    extra = {}
    if description is not None:
        extra[DESCRIPTION] = np.array(json.dumps(description, sort_keys=True))
    np.savez(path, **params, **extra)


def read_description(path: str | Path) -> dict | None:
    """The description :func:`save_params` stored in an ``.npz``, if any.

    Args:
        path: the ``.npz`` file.

    Returns:
        The description, or None for a file of arrays alone.

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: the file is not an ``.npz``, or its description is not JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if DESCRIPTION not in npz.files:
                return None
            text = str(npz[DESCRIPTION])
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not an .npz model file ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: its {DESCRIPTION} is not JSON ({exc})") from None


def load_params(path: str | Path, spec: ModelSpec) -> dict[str, np.ndarray]:
    """Read and check an ``.npz`` of parameters for ``spec``, cast to its dtype.

    Args:
        path: the ``.npz`` file, as :func:`save_params` writes it.
        spec: the network the parameters must fit.

    Returns:
        Name -> aligned array of the model's dtype.

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: the arrays do not fit ``spec`` (or the file is not an ``.npz``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parameters file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            params = {
                name: kernels.aligned_copy(npz[name], spec.np_dtype)
                for name in npz.files
                if name != DESCRIPTION
            }
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not an .npz of parameters ({exc})") from None
    check_params(spec, params, where=str(path))
    return params


def to_bias_first(params: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The original project's layout: one ``(out, in + 1)`` matrix per layer,
    bias in column 0 and weights after it (inputs had a constant 1 prepended).

    Args:
        params: name -> array, every layer's ``weight`` and ``bias``.

    Returns:
        One ``(out, in + 1)`` matrix per layer, in layer order.

    Raises:
        KeyError: a layer's weight or bias is missing.
    """
    n = len(params) // 2
    return [
        np.hstack([params[f"layer{i}.bias"][:, None], params[f"layer{i}.weight"]]) for i in range(n)
    ]


def from_bias_first(
    matrices: list[np.ndarray], dtype: str | np.dtype | None = None
) -> dict[str, np.ndarray]:
    """Inverse of :func:`to_bias_first`.

    Args:
        matrices: one ``(out, in + 1)`` matrix per layer, bias in column 0.
        dtype: the parameters' dtype; None keeps the matrices'.

    Returns:
        Name -> aligned array, ``layer{i}.weight`` and ``layer{i}.bias``.

    Raises:
        ValueError: a matrix is not 2-d with at least two columns.
    """
    params = {}
    for i, m in enumerate(matrices):
        m = np.asarray(m, dtype=dtype)
        if m.ndim != 2 or m.shape[1] < 2:
            raise ValueError(f"layer {i}: expected an (out, in + 1) matrix, got shape {m.shape}")
        params[f"layer{i}.weight"] = kernels.aligned_copy(m[:, 1:])
        params[f"layer{i}.bias"] = kernels.aligned_copy(m[:, 0])
    return params


# --------------------------------------------------------------- compute


class LayerStack:
    """Forward and backward through layers ``[first, last)`` of a network.

    A whole replica is one stack; a layer partition of a distributed replica
    is a stack over its block of layers. Activations and gradients live in
    buffers that are reused from step to step (reallocated only when the
    batch size changes). ``params`` is read at every pass, so a caller may
    swap in fetched values between steps.

    Args:
        spec: the network.
        params: name -> array of (at least) the stack's layers' parameters.
        first: the stack's first layer.
        last: one past its last layer; None: the network's end.
        grads: name -> the buffer each gradient is written into (e.g. views
            of a flat block); None allocates them.

    Raises:
        ValueError: ``[first, last)`` is empty or outside the network.
    """

    def __init__(
        self,
        spec: ModelSpec,
        params: dict[str, np.ndarray],
        first: int = 0,
        last: int | None = None,
        grads: dict[str, np.ndarray] | None = None,
    ):
        last = spec.n_layers if last is None else last
        if not 0 <= first < last <= spec.n_layers:
            raise ValueError(f"layer range [{first}, {last}) outside 0..{spec.n_layers}")
        self.spec, self.first, self.last = spec, first, last
        self.dtype = spec.np_dtype
        self.layers = [spec.layer(i) for i in range(first, last)]
        self._names = [{name: f"layer{i}.{name}" for name in layer.params()}
                       for i, layer in zip(range(first, last), self.layers)]  # fmt: skip
        self.params = params
        # The gradient buffers backward writes into; a caller may pass views
        # of one flat block (see dbnode.blocks.block_views).
        self.grads = grads if grads is not None else {
            full: kernels.zeros(spec.shapes()[full], self.dtype)
            for names in self._names for full in names.values()}  # fmt: skip
        self._batch = -1
        self._slots = 1
        self._kept: list[tuple[np.ndarray, list[dict[str, np.ndarray]]] | None] = [None]
        self.outputs: list[list[np.ndarray] | None] = [None]

    @property
    def slots(self) -> int:
        """Minibatches whose forward is kept for a later backward (default 1).

        A pipelined partition forwards several minibatches before the
        backward of the first: each forward goes in its own slot, with its
        own activations and the parameters it read (weight stashing), and
        each backward names the slot of its forward.
        """
        return self._slots

    @slots.setter
    def slots(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"slots must be >= 1, got {n}")
        self._slots, self._batch = n, -1
        self._kept = [None] * n
        self.outputs = [None] * n

    @property
    def grads(self) -> dict[str, np.ndarray]:
        """The buffers backward writes each gradient into (overwriting them)."""
        return self._grads

    @grads.setter
    def grads(self, grads: dict[str, np.ndarray]) -> None:
        self._grads = grads
        self._layer_grads = self._per_layer(grads)

    def _per_layer(self, tensors: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Each layer's own view of ``tensors`` (``weight``, ``bias``), made
        once when they are swapped in, not at every pass."""
        return [{n: tensors[full] for n, full in names.items()} for names in self._names]

    @property
    def params(self) -> dict[str, np.ndarray]:
        """The parameters (``layer{i}.weight`` ...) each pass reads."""
        return self._params

    @params.setter
    def params(self, params: dict[str, np.ndarray]) -> None:
        # Swapped in whole by a fetch: each layer's own view is made once here,
        # not at every pass.
        self._params = params
        self._layer_params = self._per_layer(params)

    def _buffers(self, batch: int, slot: int) -> None:
        # outputs[slot][k] is layer k's activation of the slot's minibatch,
        # kept for its backward; deltas[k] (dL/d(layer k's input)) and
        # scratch serve one pass at a time. A batch of another size (an
        # epoch's last) reallocates only what it uses: other slots keep theirs.
        sizes = self.spec.layers[self.first : self.last + 1]
        if self.outputs[slot] is None or self.outputs[slot][0].shape[0] != batch:
            self.outputs[slot] = [kernels.empty((batch, n), self.dtype) for n in sizes[1:]]
        if batch != self._batch:
            self.deltas = [kernels.empty((batch, n), self.dtype) for n in sizes[:-1]]
            self.scratch = [kernels.empty((batch, n), self.dtype) for n in sizes[1:]]
            self._batch = batch

    @property
    def in_size(self) -> int:
        """Input features of the stack's first layer."""
        return self.spec.layers[self.first]

    @property
    def out_size(self) -> int:
        """Outputs of the stack's last layer."""
        return self.spec.layers[self.last]

    def forward(self, x: np.ndarray, slot: int = 0) -> np.ndarray:
        """Activations of the stack's last layer for the batch ``x``.

        Args:
            x: the input batch, ``(batch, in_size)`` of the model's dtype
                (kept, not copied, until the slot's backward).
            slot: where the forward is kept for its backward (see :attr:`slots`).

        Returns:
            The last layer's output buffer, reused (overwritten) by the
            slot's next pass.

        Raises:
            ValueError: ``x`` is not ``(batch, in_size)``.
            TypeError: ``x`` is not of the model's dtype.
        """
        if x.ndim != 2 or x.shape[1] != self.in_size:
            raise ValueError(f"input: shape {x.shape} does not match (batch, {self.in_size})")
        if x.dtype != self.dtype:
            raise TypeError(f"input: dtype {x.dtype} does not match the model's {self.dtype}")
        self._buffers(x.shape[0], slot)
        self._kept[slot] = (x, self._layer_params)
        h = x
        # scratch[k] doubles as the transposed GEMM result here and as dz in
        # backward: the two uses never overlap.
        for layer, params, out, scratch in zip(self.layers, self._layer_params,
                                               self.outputs[slot], self.scratch):  # fmt: skip
            h = layer.forward(h, params, out, scratch)
        return h

    def backward(
        self,
        delta: np.ndarray,
        need_delta_below: bool = True,
        preactivation: bool = False,
        slot: int = 0,
    ) -> np.ndarray | None:
        """Gradients of the slot's last :meth:`forward` into :attr:`grads`,
        given ``delta = dL/d(output)``, at the parameters that forward read;
        returns ``dL/d(input)`` for the stack below (``None`` when
        ``need_delta_below`` is false).

        Args:
            delta: dL/d(output), of the forward's output shape.
            need_delta_below: whether to compute dL/d(input).
            preactivation: ``delta`` is already taken with respect to the
                last layer's pre-activation (softmax with cross-entropy).
            slot: the forward's slot.

        Returns:
            dL/d(input), a reused buffer, or None.

        Raises:
            ValueError: ``delta`` has the wrong shape.
        """
        kept = self._kept[slot]
        if kept is None:
            raise ValueError(f"backward of slot {slot} without its forward")
        x, params = kept
        outputs = self.outputs[slot]
        if delta.shape != outputs[-1].shape:
            raise ValueError(f"delta: shape {delta.shape} does not match {outputs[-1].shape}")
        self._buffers(x.shape[0], slot)
        n = self.last - self.first
        for k in range(n - 1, -1, -1):
            self.layers[k].backward(
                outputs[k - 1] if k else x, outputs[k], delta,
                params[k], self._layer_grads[k],
                delta_below=self.deltas[k], dz=self.scratch[k],
                need_delta_below=k > 0 or need_delta_below,
                preactivation=preactivation and k == n - 1,
            )  # fmt: skip
            delta = self.deltas[k]
        return delta if need_delta_below else None


class Loss:
    """The network's loss on its output, with the delta that starts backward.

    Call it as ``loss(out, targets, delta=None) -> (value, delta)``: the
    batch's mean loss and dL/d(out) (for cross-entropy, with respect to the
    softmax's or sigmoid's input: :attr:`preactivation`), written into
    ``delta`` if given.

    Args:
        spec: the network; its ``loss`` picks the kernel.
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.preactivation = spec.loss == "cross_entropy"

    def targets(self, y: np.ndarray) -> np.ndarray:
        """Targets in the form the kernel takes: class indices or float rows.

        Args:
            y: class labels (cross-entropy) or target values.

        Returns:
            ``intp`` labels, or ``(examples, outputs)`` rows of the model's dtype.
        """
        if self.spec.takes_labels:
            return np.asarray(y, dtype=np.intp)
        y = np.asarray(y, dtype=self.spec.np_dtype)
        return y.reshape(len(y), -1)

    def __call__(
        self, out: np.ndarray, targets: np.ndarray, delta: np.ndarray | None = None
    ) -> tuple[float, np.ndarray]:
        if self.spec.takes_labels:
            return kernels.softmax_cross_entropy(out, targets, delta)
        if self.spec.loss == "cross_entropy":
            return kernels.sigmoid_cross_entropy(out, targets, delta)
        return kernels.squared_error(out, targets, delta)


def predict(
    spec: ModelSpec, params: dict[str, np.ndarray], x: np.ndarray, batch_size: int = 1024
) -> np.ndarray:
    """Network outputs for every row of ``x``.

    Args:
        spec: the network.
        params: its parameters.
        x: the inputs, ``(examples, features)``; cast to the model's dtype.
        batch_size: rows per forward pass.

    Returns:
        A new ``(examples, outputs)`` array of the model's dtype.

    Raises:
        ValueError: ``x`` has the wrong number of features.
    """
    stack = LayerStack(spec, params)
    x = np.asarray(x, dtype=spec.np_dtype)
    outs = [
        stack.forward(np.ascontiguousarray(x[i : i + batch_size])).copy()
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outs) if outs else np.empty((0, spec.layers[-1]), spec.np_dtype)
