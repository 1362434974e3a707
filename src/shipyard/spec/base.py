"""What every part of the stack model shares: the strict base model and the unit types.

Units are parsed on the way in (CPU in cores, sizes in bytes, durations in seconds), so
every layer after the spec works with plain numbers.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict

from shipyard.spec.units import parse_cpu, parse_duration, parse_size

Cpu = Annotated[float, BeforeValidator(parse_cpu)]
Size = Annotated[int, BeforeValidator(parse_size)]
Duration = Annotated[float, BeforeValidator(parse_duration)]

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")

# The most instances of one service (replicas, autoscale max, `shipyard scale`): far beyond
# what one host runs, and a bound that keeps a slip of the finger (or 10**23) from reaching
# the store or the runtime.
MAX_REPLICAS = 100_000


class Model(BaseModel):
    # defer_build: a model's validator is built when it is first used, not at import:
    # a command that never validates some models (or none) does not pay for them
    # (importing the spec: ~50 ms and 0.6 MiB less). Validating a Stack builds its tree.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              defer_build=True)
