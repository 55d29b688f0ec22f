"""`zeray import-gguf`: a GGUF file (llama.cpp's format) as a Hugging Face model folder zeray can fine-tune.

transformers reads GGUF itself: it dequantizes the weights and rebuilds the tokenizer and chat template from the
file's metadata. It will not save a model loaded that way (it counts as quantized), so the same architecture is
built from the loaded config and given the dense weights, and that is saved (safetensors). The folder is written
beside DIR under a temporary name and renamed into place at the end: an error leaves nothing half-written.
"""

import os
import shutil
import tempfile

from core.errors import UserError, first_line

DTYPES = ("bf16", "fp32")
GGUF_MAGIC = b"GGUF"


def import_gguf(path: str, out: str, dtype: str = "bf16") -> dict:
    """Write the model in GGUF file `path` to the new (or empty) directory `out`; returns what was written."""
    check_inputs(path, out)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = os.path.split(os.path.abspath(path))
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # dense weights whatever kernels this machine has (transformers keeps blocks packed where it can)
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch_dtype, quantization_config=GgufConfig(dequantize=True)
        )
    except (ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise UserError(f"{path}: transformers cannot load this GGUF model: {first_line(exc, 200)}") from None
    config = loaded.config
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded

    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.importing-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # a directory as mkdir makes it (mkdtemp's is private)
        model.save_pretrained(staging)  # safetensors
        tokenizer.save_pretrained(staging)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "architecture": type(model).__name__,
        "parameters": model.num_parameters(),
        "vocab_size": config.get_text_config().vocab_size,
        "dtype": dtype,
        "chat_template": tokenizer.chat_template is not None,
    }


def check_inputs(path: str, out: str) -> None:
    """A GGUF file of an architecture transformers reads, and a new or empty `out`: else a one-line error."""
    check_gguf_file(path, "FILE")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"--out {out} already exists and is not an empty directory: give a new directory")
    arch = architecture(path)
    readable = gguf_architectures()
    if arch not in readable:
        raise UserError(
            f"{path}: transformers cannot read GGUF architecture {arch!r} (it reads: {', '.join(sorted(readable))})"
        )


def check_gguf_file(path: str, what: str) -> None:
    """`path` is an existing file that starts with GGUF's magic bytes, else a one-line error naming `what`."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist" + (" (it is a directory)" if os.path.isdir(path) else ""))
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise UserError(f"{what} {path} is not a GGUF file (it does not start with the bytes 'GGUF')")


def architecture(path: str) -> str:
    """The `general.architecture` the GGUF file declares."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields.get("general.architecture")
    except (ValueError, KeyError, OSError) as exc:  # a damaged or truncated file
        raise UserError(f"{path}: cannot read its GGUF header: {first_line(exc, 200)}") from None
    if field is None:
        raise UserError(f"{path}: its GGUF metadata has no general.architecture")
    return field.contents()


def gguf_architectures() -> set[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
