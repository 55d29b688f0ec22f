"""Build a small Llama-architecture chat model from nothing: a byte-level BPE tokenizer trained on the
conversations, a chat template, and randomly initialised weights, saved with `save_pretrained`.

The result is an ordinary Hugging Face model directory, loaded by the rest of zeray exactly like a downloaded
model (`AutoModelForCausalLM.from_pretrained`), so the demo and the tests exercise the real loading path
without a model hub.
"""

import json
import os

SIZES = {
    # ~27M parameters: big enough that ZeRO's fixed buffers are small beside the model states (bench/train.py).
    "small": dict(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=4096,
    ),
    # ~4M parameters: learns the demo corpus visibly in a few minutes on 2 CPU cores.
    "demo": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=4096,
    ),
    # ~0.2M parameters: for tests, a training step in milliseconds.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
    ),
}

SPECIAL = {"bos": "<|begin|>", "eos": "<|end|>", "pad": "<|pad|>", "unk": "<|unk|>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# ChatML-like: every turn is `<|role|>\ncontent<|end|>\n`; a reply is everything after `<|assistant|>\n`
# up to and including `<|end|>`, so the model learns when to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def texts_from_jsonl(path: str):
    """Every piece of text in a JSON Lines conversation file (messages/sharegpt/alpaca/text records)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            for turn in record.get("messages") or record.get("conversations") or []:
                if isinstance(turn, dict):
                    text = turn.get("content", turn.get("value"))
                    if isinstance(text, str):
                        yield text
            for key in ("instruction", "input", "output", "text"):
                if isinstance(record.get(key), str):
                    yield record[key]


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer (any UTF-8 text, no unknown tokens) wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()) + ROLE_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"],
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(data_path: str, out_dir: str, size: str = "demo", seed: int = 0, max_positions: int = 2048):
    """Train the tokenizer on `data_path`, initialise the model, and save both to `out_dir`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(SIZES[size])
    tokenizer = train_tokenizer(texts_from_jsonl(data_path), shape.pop("vocab_size"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **shape,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())
