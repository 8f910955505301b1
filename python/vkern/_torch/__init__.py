"""torch.library custom ops (``vkern::<name>``) with fake implementations, so that the ops work
under torch.compile: one module per op (``_torch/<op>.py``, beside ``ops/<op>.py``). Importing this
package registers them all; vkern does so when torch is imported (``vkern/__init__.py``) or on an
op's first torch input. Each module imports its op's wrapper; the wrappers import these modules
only inside functions (the compile path), so there is no module-level import cycle."""
from . import loki, maxsim, taskvec, vatp  # noqa: F401
