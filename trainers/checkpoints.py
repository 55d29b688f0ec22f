"""Reading the checkpoints zeray reports to Ray Train: a safety check before anything is unpickled, and the
consolidation of a (ZeRO-sharded) DeepSpeed checkpoint into a Hugging Face model directory.

Layout of one checkpoint (Ray Train merges what every rank wrote):
    ds/               DeepSpeed's own files: every rank's ZeRO shard, rank 0's module states
    latest            DeepSpeed's pointer to the tag `ds`
    zeray_state.json  the loop's position (step, epoch, micro-batches consumed in the epoch)
    hf_config/        the model's config and tokenizer, so the checkpoint alone can become a model
    hf_model/         only in the final checkpoint: the exported model
"""

import glob
import os
import re
import shutil

from zeray.errors import UserError

CKPT_TAG = "ds"
STATE_FILE = "zeray_state.json"
HF_CONFIG_DIR = "hf_config"
HF_DIR = "hf_model"


def safe_globals() -> list:
    """The only non-tensor classes a DeepSpeed checkpoint of ours may contain (plain state holders)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def verify_weights_only(checkpoint_dir: str) -> None:
    """Refuse a checkpoint whose pickles hold anything but tensors, plain data and the allowlisted classes.

    DeepSpeed unpickles its files with `weights_only=False`; loading every file first with `weights_only=True`
    (memory-mapped, so cheap) proves that this is safe before DeepSpeed does it.
    """
    import torch

    files = sorted(glob.glob(os.path.join(checkpoint_dir, "**", "*.pt"), recursive=True))
    with torch.serialization.safe_globals(safe_globals()):
        for path in files:
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                found = re.findall(r"GLOBAL (\S+)", str(exc))
                what = f"it contains {found[0]}" if found else str(exc).strip().splitlines()[0]
                raise UserError(f"checkpoint file {path} failed the weights-only safety check ({what}); "
                                "refusing to load it") from None


def find_checkpoint(run_dir: str, checkpoint: str | None = None) -> str:
    """The checkpoint to export: the one given, else the run's newest."""
    if checkpoint:
        if not os.path.isdir(os.path.join(checkpoint, CKPT_TAG)):
            raise UserError(f"--checkpoint {checkpoint} is not a zeray checkpoint (no {CKPT_TAG}/ inside)")
        return checkpoint
    found = sorted(p for p in glob.glob(os.path.join(run_dir, "checkpoint_*")) if os.path.isdir(os.path.join(p, CKPT_TAG)))
    if not found:
        raise UserError(f"{run_dir} holds no checkpoint_*/ folders; give a run directory of `zeray train`")
    return found[-1]  # Ray Train names them by time


def consolidate(checkpoint: str):
    """The full fp32 model of a checkpoint of any ZeRO stage, built from its shards; returns (model, tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config_dir = os.path.join(checkpoint, HF_CONFIG_DIR)
    if not os.path.isdir(config_dir):
        raise UserError(f"{checkpoint} has no {HF_CONFIG_DIR}/; it was not written by this version of zeray")
    verify_weights_only(os.path.join(checkpoint, CKPT_TAG))
    shards = glob.glob(os.path.join(checkpoint, CKPT_TAG, "*optim_states.pt"))
    if shards:  # ZeRO 1-3: DeepSpeed's own consolidation of the fp32 master weights
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag=CKPT_TAG)
    else:  # ZeRO 0: rank 0 saved the whole module
        module_file = os.path.join(checkpoint, CKPT_TAG, "mp_rank_00_model_states.pt")
        with torch.serialization.safe_globals(safe_globals()):
            state = torch.load(module_file, map_location="cpu", weights_only=True)["module"]
    config = AutoConfig.from_pretrained(config_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UserError(f"checkpoint {checkpoint} does not match its model config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    return model, AutoTokenizer.from_pretrained(config_dir)


def export(run_dir: str, out_dir: str, checkpoint: str | None = None) -> str:
    """Write a Hugging Face model directory (safetensors + tokenizer) from a run's checkpoint; returns its path."""
    chosen = find_checkpoint(run_dir, checkpoint)
    tmp = f"{out_dir.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if os.path.isdir(os.path.join(chosen, HF_DIR)):
        shutil.copytree(os.path.join(chosen, HF_DIR), tmp)
    else:
        model, tokenizer = consolidate(chosen)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return chosen
