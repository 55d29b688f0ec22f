"""`zeray generate`: replies from an exported model, through its own chat template."""

import os

from core.errors import UserError
from trainers.lora import holds_adapters
from trainers.remote_code import check_remote_code


def generate(
    model_dir: str,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    repetition_penalty: float = 1.0,
    trust_remote_code: bool = False,
    seed: int = 0,
) -> str:
    """The model's reply to one prompt."""
    (reply,) = generate_many(
        model_dir, [prompt], max_new_tokens, temperature, repetition_penalty, trust_remote_code, seed
    )
    return reply


def generate_many(
    model_dir: str,
    prompts: list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    repetition_penalty: float = 1.0,
    trust_remote_code: bool = False,
    seed: int = 0,
) -> list[str]:
    """The model's reply to each prompt (each a conversation of its own), the model loaded once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isfile(os.path.join(model_dir, "config.json")) and not holds_adapters(model_dir):
        raise UserError(
            f"{model_dir} is not a Hugging Face model directory (no config.json, nor "
            "adapter_config.json); give the model/ folder of a run"
        )
    check_remote_code(model_dir, trust_remote_code, "generate", "--trust-remote-code")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code, use_safetensors=True)
    model.eval()
    sampling = dict(do_sample=True, temperature=temperature, top_p=0.95) if temperature > 0 else dict(do_sample=False)
    replies = []
    for prompt in prompts:
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )["input_ids"]
        else:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        torch.manual_seed(seed)  # each reply as if asked alone
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                repetition_penalty=repetition_penalty,
                **sampling,
            )
        replies.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return replies
