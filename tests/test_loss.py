"""The chunked loss against the plain one (loss, gradients, accuracy), and gradient checkpointing against none."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

from pipelines.chat import IGNORE
from trainers.loss import TokenLoss, chunk_tokens, exact_for


def llama(vocab: int, tie: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def batch(vocab: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 21), generator=generator)
    labels = ids.clone()
    labels[:, :6] = IGNORE  # a prompt
    labels[2, 15:] = IGNORE  # and padding
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(21).expand(3, 21)}


def loss_and_grads(model, loss_of: TokenLoss, rows: dict) -> tuple[float, dict]:
    model.zero_grad()
    loss = loss_of(model, rows)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_grads(a: dict, b: dict) -> None:
    """Every gradient equal to 1e-5 of its largest entry (fp32 sums taken in another order differ in the last bits)."""
    for name, grad in a.items():
        scale = grad.abs().max().item()
        assert scale > 0 and (b[name] - grad).abs().max().item() <= 1e-5 * scale, name


@pytest.mark.parametrize("vocab, tie", [(96, True), (50_000, False)])
def test_the_chunked_loss_has_the_plain_loss_and_gradients(vocab, tie):
    model = llama(vocab, tie).train()
    rows = batch(vocab)
    plain, plain_grads = loss_and_grads(model, TokenLoss(model, chunked=False), rows)
    chunked, chunked_grads = loss_and_grads(model, TokenLoss(model, chunked=True, chunk=5), rows)
    assert chunked == pytest.approx(plain, rel=1e-5) and plain > 0
    assert_same_grads(plain_grads, chunked_grads)
    # the head is itself again afterwards: logits of the whole vocabulary
    assert model(input_ids=rows["input_ids"]).logits.shape == (3, 21, vocab)


def test_evaluation_counts_the_same_correct_predictions_chunked_and_plain(artifacts):
    model = AutoModelForCausalLM.from_pretrained(artifacts["model"], dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    rows = batch(vocab)
    rows["input_ids"][:, 6:] = rows["input_ids"][:, 5:-1]  # repetitive text: some predictions come out right
    rows["labels"] = torch.where(rows["labels"] == IGNORE, IGNORE, rows["input_ids"])
    plain, chunked = TokenLoss(model, chunked=False), TokenLoss(model, chunked=True, chunk=4)
    with torch.no_grad():
        a, b = plain(model, rows), chunked(model, rows)
    assert b.item() == pytest.approx(a.item(), rel=1e-6)
    assert int(chunked.correct) == int(plain.correct)


def test_the_chunked_loss_is_used_only_where_it_is_exact(artifacts):
    model = AutoModelForCausalLM.from_pretrained(artifacts["model"], dtype=torch.float32).train()
    assert exact_for(model) and model.training  # (the check leaves the model's mode as it was)
    # Gemma 2 soft-caps its logits after the head: the chunked loss would not be its loss
    capped = AutoModelForCausalLM.from_config(
        Gemma2Config(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            final_logit_softcapping=5.0,
        )
    )
    assert not exact_for(capped)
    # a chunk's logits about the size of the tokens' hidden states (Liger-Kernel's rule), a power of two ...
    assert chunk_tokens(16_384, 4096, 32_000) == 2048  # 16384 / ceil(32000 / 4096)
    assert chunk_tokens(65_536, 896, 151_936) == 512  # 65536 / 170 = 385.5 -> 512
    # ... but never under 32 MiB of fp32 logits (2048 / 42 = 48.8 -> 64 tokens would be 8 MiB)
    assert chunk_tokens(2048, 768, 32_000) == 262 and chunk_tokens(4096, 896, 151_936) == 55
    assert chunk_tokens(5, 64, 96) == 5 and chunk_tokens(3, 4096, 1000) == 3 and chunk_tokens(1, 768, 32_000) == 1


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = llama(96, tie=True).train()
    rows = batch(96)
    loss_of = TokenLoss(model, chunked=True, chunk=7)
    plain, plain_grads = loss_and_grads(model, loss_of, rows)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.gradient_checkpointing
    recomputed, grads = loss_and_grads(model, loss_of, rows)
    assert recomputed == pytest.approx(plain, rel=1e-6)
    assert_same_grads(plain_grads, grads)
