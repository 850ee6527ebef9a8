"""Named shapes with field overrides as a typed YAML block: `{shape: tiny, dim: 256}`.

`shape_overrides(cls, resolve)` derives the block's dataclass from a module's own config `cls` (one definition of
the fields, so a stage config embeds no second copy): `shape` plus every field of `cls` as Optional with default
None (None keeps the shape's value). `block.resolve(**extra)` -> `resolve(shape, **the fields set, **extra)`, the
module's constructor of a `cls` from a named shape."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Optional


def shape_overrides(cls: type, resolve: Callable[..., Any], name: str, default: str = "tiny",
                    exclude: tuple[str, ...] = ()) -> type:
    """The dataclass `name` of a shape-with-overrides block for config class `cls` (module doc); `exclude`: fields
    the block may not set (e.g. the LM's vocab_size, which comes from the tokenizer)."""
    hints = typing.get_type_hints(cls)
    fields = [("shape", str, dataclasses.field(default=default))]
    fields += [(f.name, Optional[hints[f.name]], dataclasses.field(default=None))  # noqa: UP007 (OmegaConf)
               for f in dataclasses.fields(cls) if f.name not in exclude]

    def resolved(self, **extra) -> Any:
        """The module config: the named shape with the set fields (and `extra`) over it."""
        set_ = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "shape" and getattr(self, f.name) is not None}
        return resolve(self.shape, **set_, **extra)

    def overridden(self) -> list[str]:
        """The fields this block sets (not None), in field order."""
        return [f.name for f in dataclasses.fields(self) if f.name != "shape" and getattr(self, f.name) is not None]

    doc = f"{cls.__name__} as a named `shape` (default {default!r}) with field overrides (None: keep the shape's)."
    return dataclasses.make_dataclass(name, fields, namespace={"resolve": resolved, "overridden": overridden,
                                                               "__doc__": doc})
