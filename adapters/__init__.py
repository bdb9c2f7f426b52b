"""functim.adapters: torch.optim wrappers over the functional core (and, in ``olmo``, OLMo-core
configs). Depends on ``functim``'s public API only."""

from .elementwise import CautiousAdamW, CautiousLion, Lion, NAdamW, SignSGD, Signum
from .kron import Kron
from .mars import Mars
from .matrix import Muon, Scion
from .schedule_free import ScheduleFreeAdamW
from .skip_step import SkipStepMixin, with_skip_step
from .soap import Soap
from .sophia import Sophia
from .torch_optim import SGD, AdamW, FunctimOptimizer, NamedAdapter

__all__ = [
    "AdamW",
    "CautiousAdamW",
    "CautiousLion",
    "FunctimOptimizer",
    "Kron",
    "Lion",
    "Mars",
    "Muon",
    "NAdamW",
    "NamedAdapter",
    "SGD",
    "ScheduleFreeAdamW",
    "Scion",
    "SignSGD",
    "Signum",
    "SkipStepMixin",
    "Soap",
    "Sophia",
    "with_skip_step",
]
