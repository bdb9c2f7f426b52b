"""Package layout: every optimizer family module is importable by its own name.

``import functim.optimizers.adamw as m`` binds ``getattr(functim.optimizers, "adamw")``, so a
package that re-exported a same-named function would hand back the function, not the module.
"""

import importlib
import pkgutil
import types

import pytest

import functim
import functim.optimizers

FAMILIES = ("adamw", "cautious", "kron", "lion", "mars", "muon", "nadamw", "schedule_free",
            "scion", "sgd", "soap", "sophia")


def test_families_list_matches_the_package():
    public = {m.name for m in pkgutil.iter_modules(functim.optimizers.__path__)
              if not m.name.startswith("_")}
    assert public == set(FAMILIES)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_module_is_importable_by_name(name):
    module = importlib.import_module(f"functim.optimizers.{name}")
    assert isinstance(module, types.ModuleType)
    assert module.__name__ == f"functim.optimizers.{name}"
    # what `import functim.optimizers.<name> as m` binds
    assert getattr(functim.optimizers, name) is module


@pytest.mark.parametrize("name", ("adamw", "kron", "lion", "mars", "muon", "nadamw", "scion",
                                  "sgd", "soap", "sophia"))
def test_constructor_is_exported_flat(name):
    module = importlib.import_module(f"functim.optimizers.{name}")
    assert getattr(functim, name) is getattr(module, name)
