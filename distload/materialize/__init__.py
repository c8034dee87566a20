"""The materialise phase: where each rank's pieces land.

* :mod:`~distload.materialize.destinations` -- fresh tensors or the caller's ``out=``;
* :mod:`~distload.materialize.model` -- a meta-device model's slots, ties and binding;
* :mod:`~distload.materialize.dtensor` -- DTensors in and out.
"""

from distload.materialize.destinations import (
    Destinations,
    destinations,
    prepare_destinations,
    untie,
)
from distload.materialize.dtensor import (
    as_dtensor_like,
    check_dtensor_request,
    check_dtensor_shapes,
    dtensor_outputs,
    is_dtensor,
    parallelize,
    placement_of_dtensors,
    tp_mesh,
)
from distload.materialize.model import (
    Entry,
    assign,
    bind,
    check_bound,
    declared_ties,
    model_entries,
    tie_groups,
)

__all__ = [
    "Destinations",
    "Entry",
    "as_dtensor_like",
    "assign",
    "bind",
    "check_bound",
    "check_dtensor_request",
    "check_dtensor_shapes",
    "declared_ties",
    "destinations",
    "dtensor_outputs",
    "is_dtensor",
    "model_entries",
    "parallelize",
    "placement_of_dtensors",
    "prepare_destinations",
    "tie_groups",
    "tp_mesh",
    "untie",
]
