"""One file per method; importing a method module registers it."""
from . import lora  # noqa: F401  (registers LORA)
from . import adapter  # noqa: F401  (registers BOTTLENECK)
from . import ia3  # noqa: F401  (registers IA3)
from . import prompt  # noqa: F401  (registers PROMPT_TUNING, P_TUNING)
from . import prefix  # noqa: F401  (registers PREFIX_TUNING)
from . import selective  # noqa: F401  (registers SELECTIVE)
