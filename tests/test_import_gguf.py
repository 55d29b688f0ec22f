"""`zeray import-gguf`: bad inputs, small GGUF files written here with the gguf package. (The real file,
SmolLM2-135M-Instruct's, is imported and checked in test_smollm2.py, whose tests share its import.)"""

import os

import numpy as np
from conftest import SMOLLM2_GGUF, write_config

from zeray.cli import main


def write_gguf(path, arch: str) -> str:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_bad_inputs_get_one_line_and_leave_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    cases = {
        (str(tmp_path / "missing.gguf"), str(out)): "FILE {} does not exist",
        (str(text), str(out)): "FILE {} is not a GGUF file (it does not start with the bytes 'GGUF')",
        (SMOLLM2_GGUF, str(tmp_path / "full")): "already exists and is not an empty directory",
        (write_gguf(tmp_path / "rwkv.gguf", "rwkv6"), str(out)): "transformers cannot read GGUF architecture 'rwkv6'",
        # an architecture it reads, but a file without the model's metadata: transformers' own reason, on one line
        (write_gguf(tmp_path / "bare.gguf", "llama"), str(out)): "transformers cannot load this GGUF model: ",
    }
    for (path, where), message in cases.items():
        assert main(["import-gguf", path, "--out", where]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message.format(path) in err, err
        assert not out.exists()
    assert sorted(os.listdir(tmp_path / "full")) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.gguf", "full", "notes.gguf", "rwkv.gguf"]  # no staging


def test_a_gguf_file_as_the_model_names_the_import_command(tmp_path, artifacts, capsys):
    config = write_config(
        tmp_path / "c.yaml",
        name="g",
        storage=str(tmp_path / "runs"),
        data={"train": artifacts["data"], "format": "messages"},
        model={"name_or_path": SMOLLM2_GGUF},
    )
    for command in (["train", config], ["prep", config], ["plan", config]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err == (
            f"error: model.name_or_path: {SMOLLM2_GGUF} is a GGUF file; zeray trains Hugging Face model folders: "
            f"convert it once with `zeray import-gguf {SMOLLM2_GGUF} --out DIR` and point model.name_or_path at DIR\n"
        )
    assert not (tmp_path / "runs").exists()
