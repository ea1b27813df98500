"""peftkit: parameter-efficient fine-tuning with Hugging Face PEFT-compatible checkpoints."""
from . import methods  # noqa: F401  (registers every method)
from .auto import (
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .compat import (
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    PeftType,
    TaskType,
    get_peft_config,
    get_peft_model_state_dict,
    load_peft_weights,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from .config import PeftConfig, registered_types
from .methods.adapter import AdapterConfig
from .methods.ia3 import IA3Config
from .methods.lora import LoraConfig
from .methods.prefix import PrefixTuningConfig
from .methods.prompt import PromptEncoderConfig, PromptTuningConfig
from .methods.selective import SelectiveConfig
from .model import PeftModel, get_peft_model
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status

__version__ = "0.1.0"
__all__ = [
    "AdapterConfig", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction", "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification",
    "IA3Config", "LoraConfig", "PeftConfig", "PeftModel", "PeftModelForCausalLM", "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification", "PeftType", "PrefixTuningConfig",
    "PromptEncoderConfig", "PromptTuningConfig", "SelectiveConfig", "TaskType", "TunerLayerStatus", "TunerModelStatus",
    "get_layer_status", "get_model_status", "get_peft_config", "get_peft_model", "get_peft_model_state_dict",
    "load_peft_weights", "prepare_model_for_kbit_training", "registered_types", "set_peft_model_state_dict",
    "PeftTrainer",  # provided on first use by __getattr__ below
]


def __getattr__(name: str):
    # PeftTrainer imports transformers.Trainer (and what it pulls in): loaded on first use, not with peftkit
    if name == "PeftTrainer":
        from .hf_trainer import PeftTrainer

        return PeftTrainer
    raise AttributeError(f"module 'peftkit' has no attribute {name!r}")
