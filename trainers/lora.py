"""LoRA (`model.lora`) with peft: adapters on a frozen base model for training, and the two ways to export it —
the base with the adapters merged into its weights (a plain Hugging Face model), or the adapters alone.

The checkpoints keep the whole PeftModel's state (frozen base included), so each one still exports on its own;
`adapter_config.json` beside the model config in a checkpoint's `hf_config/` says it holds adapters.
"""

import os

from core.errors import UserError, first_line
from trainers.config import LoraConfig

ADAPTER_CONFIG = "adapter_config.json"


def with_adapters(model, lora: LoraConfig, name_or_path: str):
    """`model` with LoRA adapters on its target modules, only they trainable."""
    import peft

    config = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
    )
    # the base an adapter-only export names: absolute when it is a local directory, so it loads from anywhere
    model.name_or_path = os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path
    try:
        return peft.get_peft_model(model, config)
    except ValueError as exc:  # no default targets for this architecture, or names that match nothing
        first = first_line(exc).rstrip(".")
        raise UserError(
            f"model.lora.target_modules: {first}; name the modules to adapt (e.g. [q_proj, v_proj]) or use all-linear"
        ) from None


def holds_adapters(config_dir: str) -> bool:
    return os.path.isfile(os.path.join(config_dir, ADAPTER_CONFIG))


def save_lora_model(state: dict, config_dir: str, out_dir: str, export: str) -> None:
    """Write the PeftModel whose weights are `state` (its full state dict, frozen base included; the model and
    adapter configs in `config_dir`) as a merged model or as adapters only."""
    import peft
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.float32)
    config = peft.PeftConfig.from_pretrained(config_dir)
    config.inference_mode = True
    base.name_or_path = config.base_model_name_or_path  # the base trained on, not config_dir: an adapter names it
    model = peft.get_peft_model(base, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = tuple(getattr(base, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if not k.endswith(tied)]
    if missing or unexpected:
        raise UserError(
            f"checkpoint weights do not match the model and adapter configs in {config_dir} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if export == "adapter":
        model.save_pretrained(out_dir, safe_serialization=True)
    else:
        merged = model.merge_and_unload()
        merged.tie_weights()
        merged.save_pretrained(out_dir, safe_serialization=True)
