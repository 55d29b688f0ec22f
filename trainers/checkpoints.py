"""Reading the checkpoints zeray reports to Ray Train: a safety check before anything is unpickled, and the
consolidation of a (ZeRO-sharded) DeepSpeed checkpoint into a Hugging Face model directory.

Layout of one checkpoint (Ray Train merges what every rank wrote):
    ds/               DeepSpeed's own files: every rank's ZeRO shard, rank 0's module states
    latest            DeepSpeed's pointer to the tag `ds`
    zeray_state.json  the loop's position (step, epoch, micro-batches consumed in the epoch) and world size
    hf_config/        the model's config and tokenizer, so the checkpoint alone can become a model
    hf_model/         only in the final checkpoint: the exported model
    zeray_files.rank<r>.json  every file rank r wrote and its size, written last: a checkpoint cut short on disk
                      (a dead node mid-copy, a full disk, a truncated file) is told apart from a whole one
"""

import dataclasses
import glob
import json
import os
import posixpath
import re
import shutil
import tempfile
from dataclasses import dataclass

import pyarrow.fs as pafs

from core.errors import UserError, first_line
from core.fs import display, download, entries, exists, files, is_local, kind, read_bytes, resolve, upload
from trainers.outputs import RUN_CONFIG

CKPT_TAG = "ds"
STATE_FILE = "zeray_state.json"
HF_CONFIG_DIR = "hf_config"
HF_DIR = "hf_model"


@dataclass(frozen=True)
class LoopState:
    """Where the training loop stands, saved in every checkpoint (STATE_FILE): the optimizer steps done, the epoch,
    the global micro-batches of that epoch consumed (where its data stream resumes), and how many workers wrote the
    checkpoint (None in checkpoints of zeray versions before elastic runs)."""

    step: int
    epoch: int
    batches_in_epoch: int
    world: int | None = None

    def write(self, folder: str) -> None:
        with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(self), f)

    @classmethod
    def read(cls, checkpoint: str, fs: pafs.FileSystem | None = None) -> "LoopState":
        """The state in `checkpoint` (a folder on a local disk, or in `fs`); raises OSError or ValueError."""
        state = json.loads(read_bytes(fs or pafs.LocalFileSystem(), f"{checkpoint}/{STATE_FILE}"))
        return cls(**{field.name: state[field.name] for field in dataclasses.fields(cls) if field.name in state})


@dataclass(frozen=True)
class CheckpointScore:
    """What makes a checkpoint better: a validation metric every checkpoint carries, smaller or larger. `zeray
    train` ranks by eval_loss; a campaign's trials by its tune.metric and tune.mode, so that what a trial keeps is
    what the campaign chooses among. Used by Ray Train's CheckpointConfig and by the pick of the exported model."""

    metric: str = "eval_loss"
    mode: str = "min"  # or "max"

    def best(self, scored: list[tuple]) -> tuple:
        """The best of (checkpoint, its metrics) pairs."""
        return (min if self.mode == "min" else max)(scored, key=lambda pair: pair[1][self.metric])


MANIFEST = "zeray_files.rank{rank}.json"
MANIFEST_NAME = re.compile(r"zeray_files\.rank\d+\.json")


def write_manifest(directory: str, rank: int) -> None:
    """List the files this rank wrote into its checkpoint folder, with their sizes (the last file it writes)."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            if not name.startswith("zeray_files."):
                files[os.path.relpath(path, directory)] = os.path.getsize(path)
    with open(os.path.join(directory, MANIFEST.format(rank=rank)), "w", encoding="utf-8") as f:
        json.dump(files, f)


def damage(checkpoint: str, fs: pafs.FileSystem | None = None) -> str | None:
    """What is missing or cut short in a checkpoint (on a local disk, or in `fs`), or None when every rank's files
    are there in full. (Checkpoints of zeray versions before manifests are taken as they are.)"""
    fs = fs or pafs.LocalFileSystem()
    try:
        world = LoopState.read(checkpoint, fs).world
    except (OSError, ValueError, TypeError) as exc:
        return f"{STATE_FILE} unreadable: {exc.__class__.__name__}"
    present = files(fs, checkpoint)  # one listing: sizes of everything there
    manifests = sorted(name for name in present if MANIFEST_NAME.fullmatch(name))
    if not manifests:
        return None if world is None else "no rank's file list"
    if world is not None and len(manifests) != world:
        return f"the files of {len(manifests)} of its {world} ranks"
    for manifest in manifests:
        try:
            listed = json.loads(read_bytes(fs, f"{checkpoint}/{manifest}"))
        except (OSError, ValueError):
            return f"{manifest} unreadable"
        for name, size in sorted(listed.items()):
            if name not in present:
                return f"{name} missing"
            if present[name] != size:
                return f"{name} has {present[name]} of its {size} bytes"
    return None


def intact_checkpoint(latest: str, fs: pafs.FileSystem | None = None) -> tuple[str, str | None]:
    """The checkpoint to resume from: `latest` when it is whole, else the newest intact one beside it (by step);
    returns it and what was wrong with `latest`. None intact: a UserError naming the damage."""
    fs = fs or pafs.LocalFileSystem()
    problem = damage(latest, fs)
    if problem is None:
        return latest, None
    latest = latest.rstrip("/")
    candidates = []
    for other in entries(fs, posixpath.dirname(latest)):
        if (
            other.type == pafs.FileType.Directory
            and other.base_name.startswith("checkpoint_")
            and other.path.rstrip("/") != latest
            and damage(other.path, fs) is None
        ):
            step = LoopState.read(other.path, fs).step
            candidates.append((step, other.base_name, other.path))
    if not candidates:
        raise UserError(
            f"checkpoint {display(fs, latest)} is damaged ({problem}) and the run has no intact one "
            "before it; remove the run's folder (or change `name`) to start afresh"
        )
    return max(candidates)[2], problem


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
                what = f"it contains {found[0]}" if found else first_line(exc)
                raise UserError(
                    f"checkpoint file {path} failed the weights-only safety check ({what}); refusing to load it"
                ) from None


def find_checkpoint(run_dir: str, checkpoint: str | None = None) -> str:
    """The checkpoint to export (a path or URI, as given): the one given, else the run's newest intact one."""
    if checkpoint:
        fs, path = resolve(checkpoint, "--checkpoint")
        if kind(fs, f"{path}/{CKPT_TAG}") != pafs.FileType.Directory:
            raise UserError(f"--checkpoint {checkpoint} is not a zeray checkpoint (no {CKPT_TAG}/ inside)")
        if problem := damage(path, fs):
            raise UserError(f"--checkpoint {checkpoint} is damaged ({problem}); choose another of the run's")
        return checkpoint
    fs, path = resolve(run_dir, "run directory")
    found = sorted(
        i.path
        for i in entries(fs, path)
        if i.type == pafs.FileType.Directory
        and i.base_name.startswith("checkpoint_")
        and kind(fs, f"{i.path}/{CKPT_TAG}") == pafs.FileType.Directory
    )
    if not found:
        raise UserError(f"{run_dir} holds no checkpoint_*/ folders; give a run directory of `zeray train`")
    return display(fs, intact_checkpoint(found[-1], fs)[0])  # Ray Train names them by time


def checkpoint_state(checkpoint: str) -> dict:
    """The full fp32 state dict of a checkpoint of any ZeRO stage: rank 0's module states (whole at stages 0-2,
    frozen LoRA base weights included), overlaid with DeepSpeed's own consolidation of the fp32 master weights
    from the ZeRO shards (stages 1-3; at stage 3 also the frozen weights' fragments)."""
    import torch

    verify_weights_only(os.path.join(checkpoint, CKPT_TAG))
    state = {}
    module_file = os.path.join(checkpoint, CKPT_TAG, "mp_rank_00_model_states.pt")  # (ZeRO-3 names it per rank)
    if os.path.isfile(module_file):
        with torch.serialization.safe_globals(safe_globals()):
            module = torch.load(module_file, map_location="cpu", weights_only=True)["module"]
        state = {k: v.float() for k, v in module.items()}
    if glob.glob(os.path.join(checkpoint, CKPT_TAG, "*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state.update(get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag=CKPT_TAG))
    return state


def config_dir(checkpoint: str) -> str:
    path = os.path.join(checkpoint, HF_CONFIG_DIR)
    if not os.path.isdir(path):
        raise UserError(f"{checkpoint} has no {HF_CONFIG_DIR}/; it was not written by this version of zeray")
    return path


def consolidate(checkpoint: str):
    """The full fp32 model of a (full-model, not LoRA) checkpoint of any ZeRO stage; returns (model, tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    configs = config_dir(checkpoint)
    state = checkpoint_state(checkpoint)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(configs), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UserError(
            f"checkpoint {checkpoint} does not match its model config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    return model, AutoTokenizer.from_pretrained(configs)


def export(run_dir: str, out_dir: str, checkpoint: str | None = None, lora: str | None = None) -> str:
    """Write a Hugging Face model directory (safetensors + tokenizer) from a run's checkpoint; returns the
    checkpoint's path. A LoRA checkpoint becomes the merged model or the adapters alone (`lora`: merged | adapter;
    default: what the run's config chose). Any of the three may be a URI (the checkpoint is then read through a
    local copy, and the model written locally first and copied up)."""
    chosen = find_checkpoint(run_dir, checkpoint)
    fs, path = resolve(chosen, "--checkpoint")
    with tempfile.TemporaryDirectory(prefix="zeray-export-") as work:
        local = path
        if not is_local(fs):
            local = os.path.join(work, "checkpoint")
            download(fs, path, local)
        out_fs, out_path = resolve(out_dir, "--out")
        if is_local(out_fs):
            _export_local(local, out_path, run_dir, lora)
        else:
            built = os.path.join(work, "model")
            _export_local(local, built, run_dir, lora)
            if exists(out_fs, out_path):
                out_fs.delete_dir(out_path)
            upload(built, out_fs, out_path)
    return chosen


def _export_local(chosen: str, out_dir: str, run_dir: str, lora: str | None) -> None:
    from transformers import AutoTokenizer

    from trainers.lora import holds_adapters, save_lora_model

    adapters = holds_adapters(os.path.join(chosen, HF_CONFIG_DIR))
    lora = (lora or run_lora_export(run_dir)) if adapters else None
    exported = os.path.join(chosen, HF_DIR)  # the final checkpoint's own export, in the run's choice of form
    tmp = f"{out_dir.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if os.path.isdir(exported) and (lora == "adapter") == holds_adapters(exported):
        shutil.copytree(exported, tmp)
    elif adapters:
        save_lora_model(checkpoint_state(chosen), config_dir(chosen), tmp, lora)
        AutoTokenizer.from_pretrained(config_dir(chosen)).save_pretrained(tmp)
    else:
        model, tokenizer = consolidate(chosen)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def run_lora_export(run_dir: str) -> str:
    """`model.lora.export` of the run's config (its config.json), merged when it is not known."""
    try:
        fs, path = resolve(run_dir, "run directory")
        return ((json.loads(read_bytes(fs, f"{path}/{RUN_CONFIG}")).get("model") or {}).get("lora") or {}).get(
            "export"
        ) or "merged"
    except (OSError, ValueError, UserError):
        return "merged"
