"""Module surgery on a timm model: swap submodules in place with an exact undo, and graft one module's parts.

A conversion (EcoFormer's hashed attention, ...) replaces some layers of a
model by layers that reuse the originals' weights. `replace_modules` does the
swap and remembers what it removed, so `Replacement.undo()` puts back the
very same module objects; `graft` gives a new layer the parts of the old one
(the same submodules, parameters, buffers and plain attributes, shared, not
copied) without listing them by hand, so a timm version that adds a part to
its `Attention`, or a user's subclass that adds its own, is carried along.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import nn

# What `nn.Module.__init__` itself puts in a module's __dict__: hook tables and flags every module owns.
# `graft` shares the three part tables and the `training` flag, and leaves the rest to the target.
_PART_TABLES = ("_parameters", "_buffers", "_modules")
_MODULE_MACHINERY = frozenset(vars(nn.Module())) - set(_PART_TABLES) - {"training", "_non_persistent_buffers_set"}


@dataclass
class Replacement:
    """The submodules `replace_modules` swapped: name -> (original, replacement), in the order swapped.

    `undo()` restores the originals (the same objects) and can run once. It
    refuses when a swapped place no longer holds the replacement (the model
    was changed again since), naming the place.
    """

    model: nn.Module
    swapped: dict[str, tuple[nn.Module, nn.Module]] = field(default_factory=dict)
    undone: bool = False

    @property
    def originals(self) -> dict[str, nn.Module]:
        return {name: pair[0] for name, pair in self.swapped.items()}

    @property
    def replacements(self) -> dict[str, nn.Module]:
        return {name: pair[1] for name, pair in self.swapped.items()}

    def undo(self) -> nn.Module:
        """Put every original module back where it was; returns the model."""
        if self.undone:
            raise RuntimeError("this replacement was already undone")
        for name, (_, replacement) in self.swapped.items():
            if self.model.get_submodule(name) is not replacement:
                raise RuntimeError(f"cannot undo: '{name}' no longer holds the module that replaced it "
                                   "(the model was modified after the replacement); nothing was restored")
        for name, (original, _) in reversed(list(self.swapped.items())):
            set_submodule(self.model, name, original)
        self.undone = True
        return self.model


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `name` of `model` (works inside Sequential and ModuleList too)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _selected(module: nn.Module, prefix: str, select: Callable[[str, nn.Module], bool]
              ) -> Iterable[tuple[str, nn.Module]]:
    for child_name, child in module._modules.items():  # every place, shared modules included (unlike named_children)
        if child is None:
            continue
        name = f"{prefix}.{child_name}" if prefix else child_name
        if select(name, child):
            yield name, child  # a selected module is replaced whole: nothing inside it is visited
        else:
            yield from _selected(child, name, select)


def replace_modules(model: nn.Module, select: Callable[[str, nn.Module], bool],
                    make: Callable[[str, nn.Module], nn.Module]) -> Replacement:
    """Replace, in place, every submodule of `model` that `select(name, module)` picks by `make(name, module)`.

    Names are those of `model.named_modules(remove_duplicate=False)`. The outermost selected modules
    are replaced (what lies inside one is not visited), all found before any
    is swapped. A module reachable under several names is made once and the
    replacement shared the same way. The model itself is never replaced.

    Returns:
        A `Replacement` whose `undo()` restores the original module objects.
    """
    chosen = list(_selected(model, "", select))
    made: dict[int, nn.Module] = {}
    replacement = Replacement(model)
    for name, original in chosen:
        if id(original) not in made:
            made[id(original)] = make(name, original)
        replacement.swapped[name] = (original, made[id(original)])
    for name, (_, new) in replacement.swapped.items():
        set_submodule(model, name, new)
    return replacement


def graft(target: nn.Module, source: nn.Module, names: Iterable[str] | None = None) -> tuple[str, ...]:
    """Give `target` the parts of `source` under the same names: the same objects, shared, not copied.

    Parts are submodules, parameters, buffers (persistent or not) and plain
    attributes (timm's `num_heads`, `scale`, `fused_attn`, ...), and the
    `training` flag; hooks stay `target`'s own. `names` limits the graft to
    those parts (e.g. what an earlier graft returned, to hand them back).

    Returns:
        The names of the parts grafted, so that they can be grafted back.
    """
    wanted = None if names is None else set(names)
    taken: list[str] = []
    for table in _PART_TABLES:
        for name, value in getattr(source, table).items():
            if wanted is None or name in wanted:
                getattr(target, table)[name] = value
                taken.append(name)
                if table == "_buffers" and name in source._non_persistent_buffers_set:
                    target._non_persistent_buffers_set.add(name)
    for name, value in vars(source).items():
        if name in _MODULE_MACHINERY or name in _PART_TABLES or name == "_non_persistent_buffers_set":
            continue
        if wanted is None or name in wanted:
            target.__dict__[name] = value
            taken.append(name)
    return tuple(taken)
