"""feathertune: parameter-efficient fine-tuning that is small, readable and fast.

    import feathertune as ft
    model = ft.attach(model, ft.LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    ft.save_adapter(model, "out/adapter")   # PEFT's file format

One config class per method (LoraConfig, IA3Config, BottleneckConfig, PromptTuningConfig,
PrefixTuningConfig, LlamaAdapterConfig, PartialConfig, ReftConfig); `attach`, `save_adapter` and the rest take any of them.
"""

from feathertune.adapters import (
    attach,
    delete_adapter,
    disabled,
    merge,
    set_active,
    trainable_parameters,
    unmerge,
)
from feathertune.checkpoint import load_adapter, save_adapter
from feathertune.errors import (
    AdapterMismatchError,
    ConfigError,
    DataError,
    FeathertuneError,
    TargetError,
    UnsupportedAdapterError,
)
from feathertune.methods.bottleneck import BottleneckConfig
from feathertune.methods.ia3 import IA3Config
from feathertune.methods.llama_adapter import LlamaAdapterConfig
from feathertune.methods.lora import LoraConfig
from feathertune.methods.lora_combine import combine
from feathertune.methods.partial import PartialConfig
from feathertune.methods.prefix_tuning import PrefixTuningConfig
from feathertune.methods.prompt_tuning import PromptTuningConfig
from feathertune.methods.reft import ReftConfig
from feathertune.models import load_model
from feathertune.quant import quantize
from feathertune.train.config import TrainConfig, load_config
from feathertune.train.loop import run

__version__ = "0.1.0"

__all__ = [
    "AdapterMismatchError",
    "BottleneckConfig",
    "ConfigError",
    "DataError",
    "FeathertuneError",
    "IA3Config",
    "LlamaAdapterConfig",
    "LoraConfig",
    "PartialConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "ReftConfig",
    "TrainConfig",
    "TargetError",
    "UnsupportedAdapterError",
    "attach",
    "combine",
    "delete_adapter",
    "disabled",
    "load_adapter",
    "load_config",
    "load_model",
    "merge",
    "quantize",
    "run",
    "save_adapter",
    "set_active",
    "trainable_parameters",
    "unmerge",
]
