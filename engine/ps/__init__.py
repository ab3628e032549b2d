"""The parameter server: shards of named tensors, their format on disk, their service, their client.

==============  ========  ================================================
module          trio?     holds
==============  ========  ================================================
``shard``       no        :class:`ParameterShard`: tensors, optimizers,
                          versions, deduplicated pushes (no I/O at all)
``snapshot``    no        the snapshot format over file objects
``service``     yes       the shard's request handlers, as a table
``client``      yes       :class:`ParameterClient`: a model over the shards
==============  ========  ================================================
"""

from .._lazy import lazy

_EXPORTS = {
    "ParameterShard": ".shard",
    "Pulled": ".shard",
    "ParameterClient": ".client",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy(__name__, _EXPORTS)
